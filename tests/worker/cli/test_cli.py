"""``lsb``: every command on real images shipped with ultralytics and on synthetic data.

Detectors are the real code paths: OWL-ViT/SAM as tiny random models loaded from disk, Gemini
through the real google-genai client against tests/fake_gemini.py, YOLO as a random checkpoint,
Label Studio as tests/fake_label_studio.py (plus the predictions API the push job needs).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis as redis_lib
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.core import geometry
from backend.core.detections import Detections
from backend.core.files import write_json_atomic
from backend.core.settings import get_settings
from backend.evaluation.truth import load_truth
from tests import fake_gemini as fg
from tests.fake_label_studio import FakeLabelStudio
from tests.models import make_checkpoint
from tests.paths import ROOT, TEST_REDIS_URL
from tests.synthetic import label_config, make_images
from worker.cli import results
from worker.cli.__main__ import main

ASSETS = Path(__import__("ultralytics").__file__).parent / "assets"
CLASSES = ("Car", "Person", "Sign")


@pytest.fixture
def env(tmp_path, monkeypatch, redis_url):
    """A clean configuration: test Redis, private model/data dirs, no Gemini, no Label Studio."""
    for name in list(os.environ):
        if name.startswith(("GEMINI_", "GOOGLE_", "LABEL_STUDIO_", "OWLVIT_", "SAM_", "YOLO_MODEL")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GEMINI_DAILY_BUDGET_USD", "0")
    get_settings.cache_clear()
    client = redis_lib.Redis.from_url(redis_url)
    before = set(client.scan_iter("lsb:gemini:*"))
    spend = {k: client.get(k) for k in before if b":spend" in k}
    yield tmp_path
    for key in set(client.scan_iter("lsb:gemini:*")) - before:  # leave the shared test Redis as found
        client.delete(key)
    for key, value in spend.items():
        client.set(key, value)
    get_settings.cache_clear()


def lsb(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """Run ``lsb argv`` in-process: (exit code, stdout JSON or None, stderr)."""
    code = main([str(a) for a in argv] + ["-q"])
    out, err = capsys.readouterr()
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    return code, data, err


def synthetic_folder(folder: Path, n: int = 6, seed: int = 0, size=(128, 96)):
    """Images in a nested folder; returns [(relative name, SyntheticImage)]."""
    out = []
    for i, im in enumerate(make_images(n, seed=seed, size=size, max_objects=2)):
        name = f"{'sub/' if i % 2 else ''}img{i}.png"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        im.image.save(path)
        out.append((name, im))
    return out


def write_results(folder: Path, images_dir: Path, items, xml: str, shift: float = 0.0, masks: bool = False) -> None:
    """``lsb detect``-style results holding the true boxes (optionally shifted / with box masks)."""
    config_labels = list(CLASSES)
    for name, im in items:
        boxes = np.array([b.xyxy for b in im.boxes], dtype=float).reshape(-1, 4) + shift
        labels = [b.label for b in im.boxes]
        m = np.stack([geometry.box_to_mask(b, im.width, im.height) for b in boxes]) if masks and len(boxes) else (
            np.zeros((0, im.height, im.width), bool) if masks else None)
        det = Detections(boxes, labels, np.linspace(0.9, 0.6, len(labels)), im.image.size, "gemini", "gemini-2.5-flash", m,
                         {"latency_s": 0.5})
        path = images_dir / name
        doc = results.to_json(det, {"name": name, "path": str(path), "url": None, "sha256": results_sha(path)}, config_labels,
                              xml)
        write_json_atomic(folder / Path(name).with_suffix(".json"), doc, indent=1)


def results_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- help and usage -------------------------------------------------------------------------------

def test_help_and_usage_errors(env, capsys):
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0
    for command in ("detect", "export", "push", "check", "train", "eval", "versions", "rollback", "base-model"):
        assert command in proc.stdout
    code, _, err = lsb(capsys, "detect", ASSETS, "--source", "owlvit", "--out", env / "x")
    assert code == 2 and "--label-config" in err and "Traceback" not in err
    code, _, err = lsb(capsys, "detect", env / "missing", "--source", "owlvit", "--labels", "a", "--out", env / "x")
    assert code == 2 and "not a file, folder or URL" in err
    text = (ROOT / "pyproject.toml").read_text()
    assert 'lsb = "worker.cli.__main__:main"' in text


# --- detect ---------------------------------------------------------------------------------------

def test_detect_owlvit_on_real_images_png_and_resume(env, capsys, tiny_models):
    out = env / "drafts"
    args = ["detect", ASSETS, "--source", "owlvit", "--model", tiny_models["owlv2"], "--labels", "person,bus=a city bus",
            "--threshold", "0", "--out", out]
    code, summary, err = lsb(capsys, *args)
    assert code == 0, err
    assert summary["done"] == 2 and summary["skipped"] == 0 and summary["source"] == "owlvit" and summary["objects"] > 0
    sizes = {"bus": (810, 1080), "zidane": (1280, 720)}
    for stem, size in sizes.items():
        doc = json.loads((out / f"{stem}.json").read_text())
        assert doc["schema"] == "lsb.detections/1" and doc["complete"] is True and doc["source"] == "owlvit"
        assert (doc["image"]["width"], doc["image"]["height"]) == size and doc["image"]["name"] == f"{stem}.jpg"
        assert doc["labels"] == ["person", "bus"] and 'hint="a city bus"' in doc["label_config"]
        assert doc["objects"] and {o["label"] for o in doc["objects"]} <= {"person", "bus"}
        for o in doc["objects"]:
            assert o["box"]["ls"] == pytest.approx(geometry.xyxy_to_ls(o["box"]["xyxy"], *size), abs=1e-4)
            assert o["mask"] is None
        with Image.open(out / f"{stem}.annotated.png") as png:
            assert png.format == "PNG" and png.size == size
        det = results.from_json(doc)
        assert len(det) == len(doc["objects"]) and det.image_size == size

    # Resumable: a second run skips both; their files are untouched.
    stamp = (out / "bus.json").stat().st_mtime_ns
    code, summary, _ = lsb(capsys, *args)
    assert code == 0 and summary["skipped"] == 2 and summary["done"] == 0 and (out / "bus.json").stat().st_mtime_ns == stamp
    # A missing picture is redrawn from the JSON; an incomplete JSON is done again.
    (out / "bus.annotated.png").unlink()
    doc = json.loads((out / "zidane.json").read_text())
    (out / "zidane.json").write_text(json.dumps({**doc, "complete": False}))
    code, summary, _ = lsb(capsys, *args)
    assert code == 0 and summary["skipped"] == 1 and summary["redrawn"] == 1 and summary["done"] == 1
    assert (out / "bus.annotated.png").is_file() and results.read_result(out / "zidane.json") is not None
    assert (out / "bus.json").stat().st_mtime_ns == stamp


def test_detect_owlvit_sam_masks(env, capsys, tiny_models):
    out = env / "masks"
    code, _, err = lsb(capsys, "detect", ASSETS / "zidane.jpg", "--source", "owlvit", "--model", tiny_models["owlv2"],
                       "--sam-model", tiny_models["sam"], "--labels", "person", "--tag", "brush", "--threshold", "0",
                       "--out", out)
    assert code == 0, err
    doc = json.loads((out / "zidane.json").read_text())
    assert doc["model"].endswith("+sam") and doc["objects"]
    for o in doc["objects"]:
        mask = geometry.rle_to_mask(o["mask"]["rle"])
        assert mask.shape == (720, 1280) and mask.sum() == o["mask"]["area"] > 0
        assert o["mask"]["polygon"] is None or len(o["mask"]["polygon"]) >= 3
    assert results.from_json(doc).masks.shape == (len(doc["objects"]), 720, 1280)


def test_detect_gemini_boxes_cache_cost_and_failures(env, capsys, monkeypatch):
    items = synthetic_folder(env / "photos", n=6)
    oracle = fg.Oracle()  # answers with each image's true boxes
    for _, im in items:
        oracle.add(im.image, [(b.xyxy, b.label) for b in im.boxes])
    with fg.FakeGemini(responder=oracle) as fake:
        monkeypatch.setenv("GEMINI_API_KEY", fg.DEFAULT_KEY)
        monkeypatch.setenv("GEMINI_BASE_URL", fake.base_url)
        fake.script(fg.bad_request())  # one image fails (not retried): it gets no JSON and is redone next run
        args = ["detect", env / "photos", "--source", "gemini", "--labels", ",".join(CLASSES), "--out", env / "drafts",
                "--workers", "3"]
        code, summary, _ = lsb(capsys, *args)
        assert code == 1 and summary["done"] == 5 and summary["failed"] == 1
        assert "client_error" in summary["failures"][0]["error"]
        assert summary["cost_usd"] > 0 and summary["tokens"] > 0 and summary["cached"] == 0
        code, summary, _ = lsb(capsys, *args)
        assert code == 0 and summary["done"] == 1 and summary["skipped"] == 5
        assert len(fake.calls) == 7
        for name, im in items:
            doc = json.loads((env / "drafts" / Path(name).with_suffix(".json")).read_text())
            det = results.from_json(doc)
            assert sorted(det.labels) == sorted(b.label for b in im.boxes)
            truth = np.array([b.xyxy for b in im.boxes]).reshape(-1, 4)
            assert all(geometry.box_iou(det.xyxy[i:i + 1], truth).max() > 0.8 for i in range(len(det)))
            assert (env / "drafts" / Path(name).with_suffix(".annotated.png")).is_file()
        # The same images again (--overwrite): all answers come from the Redis cache, free.
        code, summary, _ = lsb(capsys, *args, "--overwrite")
        assert code == 0 and summary["done"] == 6 and summary["cached"] == 6 and summary["cost_usd"] == 0
        assert len(fake.calls) == 7


def test_detect_yolo_checkpoint(env, capsys):
    ckpt = make_checkpoint(env / "m.pt", list(CLASSES))
    synthetic_folder(env / "photos", n=2)
    code, _, err = lsb(capsys, "detect", env / "photos" / "img0.png", "--source", "yolo", "--model", ckpt,
                             "--labels", ",".join(CLASSES), "--threshold", "0.0", "--out", env / "out")
    assert code == 0, err
    doc = json.loads((env / "out" / "img0.json").read_text())
    assert doc["source"] == "yolo" and doc["model"] == "yolo:m" and (doc["image"]["width"], doc["image"]["height"]) == (128, 96)
    assert {o["label"] for o in doc["objects"]} <= set(CLASSES)
    code, _, err = lsb(capsys, "detect", env / "photos", "--source", "yolo", "--labels", "Car", "--out", env / "out2")
    assert code == 2 and "--model" in err


# --- export ---------------------------------------------------------------------------------------

@pytest.fixture
def drafted(env):
    """Synthetic images + lsb detect results with their true boxes (and box-shaped masks)."""
    items = synthetic_folder(env / "photos", n=8, seed=2)
    xml = label_config(CLASSES, tag="BrushLabels").replace(
        "</View>",
        label_config(CLASSES)[label_config(CLASSES).index("<RectangleLabels"):].replace('name="label"', 'name="box"'))
    write_results(env / "drafts", env / "photos", items, xml, masks=True)
    return items, xml


def test_export_label_studio_tasks_validate(env, capsys, drafted):
    items, xml = drafted
    code, summary, err = lsb(capsys, "export", "ls", env / "drafts", "--out", env / "tasks.json", "--document-root", env)
    assert code == 0, err
    assert summary["tasks"] == len(items)
    tasks = json.loads((env / "tasks.json").read_text())
    interface = LabelInterface(xml)
    by_url = {t["data"]["image"]: t for t in tasks}
    for name, im in items:
        task = by_url[f"/data/local-files/?d=photos/{name}"]
        prediction = task["predictions"][0]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        assert prediction["model_version"] == "gemini:gemini-2.5-flash"
        kinds = sorted(r["type"] for r in prediction["result"])
        assert kinds == sorted(["brushlabels", "rectanglelabels"] * len(im.boxes))
        rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        got = sorted(tuple(np.round(geometry.ls_to_xyxy(r["value"], im.width, im.height), 3)) for r in rects)
        assert got == sorted(tuple(np.round(b.xyxy, 3)) for b in im.boxes)
    code, _, _ = lsb(capsys, "export", "ls", env / "drafts", "--out", env / "cloud.json", "--url-prefix", "gs://bucket/photos/")
    urls = sorted(t["data"]["image"] for t in json.loads((env / "cloud.json").read_text()))
    assert code == 0 and urls == sorted(f"gs://bucket/photos/{name}" for name, _ in items)
    code, _, err = lsb(capsys, "export", "ls", env / "drafts", "--out", env / "none.json")
    assert code == 2 and "--document-root" in err
    code, _, err = lsb(capsys, "export", "ls", env / "drafts", "--out", env / "x.json", "--document-root", env / "elsewhere")
    assert code == 2 and "not under" in err


def test_export_yolo_and_coco_round_trip_boxes(env, capsys, drafted):
    items, _ = drafted
    code, summary, err = lsb(capsys, "export", "yolo", env / "drafts", "--out", env / "ds")
    assert code == 0, err
    data_yaml = Path(summary["data_yaml"])
    truth = load_truth(data_yaml, split="all")
    assert truth.classes == list(CLASSES) and len(truth.images) == len(items)
    manifest = json.loads((data_yaml.parent / "manifest.json").read_text())
    originals = {i + 1: im for i, (_, im) in enumerate(sorted(items, key=lambda x: x[0]))}
    for t in truth.images:
        im = originals[int(Path(t.name).stem)]
        assert t.truth.image_size == (im.width, im.height)
        assert sorted(zip(t.truth.labels, map(tuple, np.round(t.truth.xyxy, 2)))) == \
            sorted((b.label, tuple(np.round(b.xyxy, 2))) for b in im.boxes)
    assert manifest["counts"]["images"] == len(items)

    code, summary, err = lsb(capsys, "export", "coco", env / "drafts", "--out", env / "coco" / "drafts.json")
    assert code == 0, err
    assert summary["categories"] == list(CLASSES)
    coco = load_truth(env / "coco" / "drafts.json", images_root=env / "photos")
    assert coco.has_masks and len(coco.images) == len(items)
    by_name = dict(items)
    for t in coco.images:
        im = by_name[t.name]
        assert t.path == env / "photos" / t.name
        assert np.allclose(sorted(map(tuple, t.truth.xyxy)), sorted(b.xyxy for b in im.boxes), atol=1e-3)
        for box, mask in zip(t.truth.xyxy, t.truth.masks):
            assert (mask ^ geometry.box_to_mask(box, im.width, im.height)).sum() <= 2 * (box[2] - box[0] + box[3] - box[1])


# --- eval -----------------------------------------------------------------------------------------

def test_eval_saved_predictions_perfect_and_shifted(env, capsys, drafted):
    items, xml = drafted
    code, _, _ = lsb(capsys, "export", "coco", env / "drafts", "--out", env / "truth.json")
    assert code == 0
    code, summary, err = lsb(capsys, "eval", "--truth", env / "truth.json", "--images", env / "photos",
                             "--predictions", env / "drafts", "--out", env / "report")
    assert code == 0, err
    assert summary["map50_95"] == 1.0 and summary["map50"] == 1.0 and summary["precision"] == 1.0 and summary["recall"] == 1.0
    assert summary["masks"]["instance_miou"] == 1.0 and summary["masks"]["segm_map50"] == 1.0
    report = (env / "report" / "report.md").read_text()
    assert "mAP50-95 (pycocotools) | 1.000" in report and (env / "report" / "plots" / "iou_histogram.png").is_file()

    write_results(env / "shifted", env / "photos", items, xml, shift=4.0, masks=True)
    code, summary, _ = lsb(capsys, "eval", "--truth", env / "truth.json", "--images", env / "photos",
                           "--predictions", env / "shifted", "--out", env / "report2")
    assert code == 0 and summary["map50_95"] < 1.0 and summary["mean_iou"] < 1.0 and summary["masks"]["instance_miou"] < 1.0
    perfect = json.loads((env / "report" / "metrics.json").read_text())
    confusion = perfect["confusion"]
    assert confusion["columns"][-1] == "missed" and confusion["rows"][-1] == "background"
    assert sum(confusion["matrix"][i][i] for i in range(len(CLASSES))) == perfect["n_gt"] and perfect["label_errors"] == []
    assert "## Confusion matrix" in report and (env / "report" / "plots" / "confusion.png").is_file()

    # boxes moved off their objects: every confident box contradicts the labels; side by side with the true drafts
    write_results(env / "far", env / "photos", items, xml, shift=40.0)
    code, summary, err = lsb(capsys, "eval", "--truth", env / "truth.json", "--images", env / "photos", "--predictions",
                             env / "far", "--compare", env / "drafts", "--max-errors", "5", "--out", env / "report3")
    assert code == 0, err
    far = json.loads((env / "report3" / "metrics.json").read_text())
    assert [c["kind"] for c in far["label_errors"]] == ["missed_label"] * 5
    scores = [c["score"] for c in far["label_errors"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 0.9
    assert sum(row[-1] for row in far["confusion"]["matrix"][:-1]) > 0  # true boxes missed
    assert sum(far["confusion"]["matrix"][-1]) > 0  # predictions on background
    sides = far["side_by_side"]
    assert sides["gemini (compared)"]["map50"] == 1.0 and sides["gemini (evaluated)"]["map50"] < 0.5
    assert sides["gemini (compared)"]["n_images"] == sides["gemini (evaluated)"]["n_images"] == 8
    text = (env / "report3" / "report.md").read_text()
    assert "## Sources side by side" in text and "## Label-error candidates" in text and "| missed_label |" in text


def test_eval_runs_a_source_on_a_yolo_dataset_and_a_registry_version(env, capsys, drafted, tiny_models, redis_url):
    code, summary, _ = lsb(capsys, "export", "yolo", env / "drafts", "--out", env / "ds")
    ds = Path(summary["data_yaml"]).parent
    code, summary, err = lsb(capsys, "eval", "--truth", ds, "--split", "all", "--source", "owlvit",
                             "--model", tiny_models["owlv2"], "--out", env / "rep-owl")
    assert code == 0, err
    metrics = json.loads((env / "rep-owl" / "metrics.json").read_text())
    assert metrics["n_images"] == 8 and metrics["speed"]["images_per_second"] > 0 and len(metrics["speed"]["latencies_s"]) == 8
    assert "owlvit" in metrics["about"]["source"] and 0 <= metrics["coco"]["map50_95"] <= 1

    from backend.core.registry import ModelRegistry

    project = str(random.randint(10_000_000, 99_999_999))
    registry = ModelRegistry(env / "models", redis_lib.Redis.from_url(redis_url))
    try:
        info = registry.add_version(project, make_checkpoint(env / "r.pt", list(CLASSES)), {"classes": list(CLASSES)})
        registry.promote(project, info.version)
        code, summary, err = lsb(capsys, "eval", "--truth", ds, "--split", "all", "--source", "yolo", "--project", project,
                                 "--out", env / "rep-yolo")
        assert code == 0, err
        metrics = json.loads((env / "rep-yolo" / "metrics.json").read_text())
        assert metrics["about"]["source"] == "yolo yolo:v0001" and metrics["about"]["source threshold"] == 0.001
    finally:
        redis_lib.Redis.from_url(redis_url).delete(f"lsb:model:{project}:current")


# --- check ----------------------------------------------------------------------------------------

def test_check_ok_bad_key_and_not_configured(env, capsys, monkeypatch):
    with fg.FakeGemini() as fake:
        monkeypatch.setenv("GEMINI_BASE_URL", fake.base_url)
        fake.script(fg.ok("OK", prompt_tokens=7, output_tokens=1, model_version="gemini-2.5-flash-001"))
        monkeypatch.setenv("GEMINI_API_KEY", fg.DEFAULT_KEY)
        code, out, err = lsb(capsys, "check")
        assert code == 0, err
        assert out["ok"] and out["model"] == "gemini-2.5-flash" and out["model_version"] == "gemini-2.5-flash-001"
        assert out["tokens"]["total"] == 8 and out["latency_s"] >= 0 and out["answer"] == "OK" and out["cost_usd"] > 0
        assert len(fake.calls) == 1 and fake.calls[0].thinking_budget == 0

        monkeypatch.setenv("GEMINI_API_KEY", "wrong-key-123")
        code, out, err = lsb(capsys, "check")
        assert code == 1 and out is None
        assert "API key was rejected" in err and "GEMINI_API_KEY" in err and "wrong-key-123" not in err

        monkeypatch.setenv("GEMINI_API_KEY", fg.DEFAULT_KEY)
        fake.script(fg.error(404, "NOT_FOUND", "models/nope is not found for API version v1"))
        code, _, err = lsb(capsys, "check", "--model", "nope")
        assert code == 1 and "model 'nope' was not found" in err
    monkeypatch.setenv("GEMINI_BASE_URL", "http://127.0.0.1:9")  # nothing listens
    code, _, err = lsb(capsys, "check", "--timeout", "2")
    assert code == 1 and "cannot reach" in err
    monkeypatch.delenv("GEMINI_API_KEY")
    code, _, err = lsb(capsys, "check")
    assert code == 2 and "not configured" in err


# --- push -----------------------------------------------------------------------------------------

def queued_prelabel(project: str) -> dict:
    """Stands in for worker.jobs.prelabeling.prelabel_tasks in the --queue test."""
    return {"project": project, "stored": 0}


FakeLabelStudioWithPredictions = FakeLabelStudio  # the fake serves /api/predictions/ itself


def test_push_in_process_is_resumable_and_valid(env, capsys, monkeypatch):
    xml = label_config(CLASSES)
    images = make_images(5, seed=9, max_objects=2)
    oracle = fg.Oracle()
    for im in images:
        oracle.add(im.image, [(b.xyxy, b.label) for b in im.boxes])
    with FakeLabelStudioWithPredictions() as ls, fg.FakeGemini(responder=oracle) as fake:
        pid = ls.add_project(xml)
        ids = [ls.add_task(pid, im.encode()) for im in images]
        for name, value in (("LABEL_STUDIO_URL", ls.url), ("LABEL_STUDIO_API_KEY", ls.pat), ("GEMINI_API_KEY", fg.DEFAULT_KEY),
                            ("GEMINI_BASE_URL", fake.base_url), ("ROUTING", "gemini")):
            monkeypatch.setenv(name, value)
        code, out, err = lsb(capsys, "push", "--project", pid, "--chunk", "2")
        assert code == 0, err
        assert out["tasks"] == 5 and out["stored"] == 5 and out["failed"] == 0
        interface = LabelInterface(xml)
        for tid, im in zip(ids, images):
            (pred,) = ls.tasks[tid]["predictions"]
            assert pred["model_version"] == "gemini:gemini-2.5-flash"
            assert interface.validate_prediction({"result": pred["result"], "score": pred["score"], "model_version": "x"},
                                                 return_errors=True) == []
            assert sorted(r["value"]["rectanglelabels"][0] for r in pred["result"]) == sorted(b.label for b in im.boxes)
        code, out, _ = lsb(capsys, "push", "--project", pid)
        assert code == 0 and out["stored"] == 0 and out["skipped"] == 5 and len(fake.calls) == 5
        code, out, _ = lsb(capsys, "push", "--project", pid, "--tasks", f"{ids[0]},999999")
        assert code == 2

        # --queue hands the job to RQ (here a synchronous queue, so it has run by the time --wait looks).
        from rq import Queue

        calls = []

        def enqueue(redis, project, tasks, settings=None):
            calls.append((project, tasks))
            return Queue(f"test-lsb-push-{project}", connection=redis, is_async=False).enqueue(queued_prelabel, project).id

        monkeypatch.setattr("worker.cli.push.enqueue_prelabel", enqueue)
        code, out, _ = lsb(capsys, "push", "--project", pid, "--queue", "--wait")
        assert code == 0 and calls == [(str(pid), None)]
        assert out["queued"] and out["status"] == "finished" and out["result"] == {"project": str(pid), "stored": 0}
        jobs = [out["job_id"]]
        code, out, _ = lsb(capsys, "push", "--project", pid, "--queue", "--tasks", str(ids[1]))
        jobs.append(out["job_id"])
        assert code == 0 and calls[-1][1] == [{"id": ids[1], "data": ls.tasks[ids[1]]["data"]}] and out["tasks"] == 1
        from rq.job import Job

        for job_id in jobs:
            Job.fetch(job_id, connection=redis_lib.Redis.from_url(TEST_REDIS_URL)).delete()
    monkeypatch.delenv("LABEL_STUDIO_URL")
    code, _, err = lsb(capsys, "push", "--project", "3")
    assert code == 2 and "LABEL_STUDIO_URL" in err


# --- train, versions, rollback --------------------------------------------------------------------

def test_train_local_dataset_register_versions_rollback(env, capsys, redis_url):
    items = synthetic_folder(env / "photos", n=10, seed=4, size=(96, 64))
    xml = label_config(CLASSES)
    write_results(env / "drafts", env / "photos", items, xml)
    code, summary, _ = lsb(capsys, "export", "yolo", env / "drafts", "--out", env / "ds", "--val-fraction", "0.3")
    assert code == 0
    ds = Path(summary["data_yaml"]).parent
    project = str(random.randint(10_000_000, 99_999_999))
    client = redis_lib.Redis.from_url(redis_url)
    try:
        code, out, err = lsb(capsys, "train", "--data", ds, "--epochs", "1", "--imgsz", "64", "--batch", "4",
                             "--out", env / "best.pt", "--report", env / "train-report", "--register", project, "--promote")
        assert code == 0, err
        assert Path(out["checkpoint"]).is_file() and out["classes"] == list(CLASSES) and out["epochs_run"] == 1
        assert 0 <= out["val"]["map50_95"] <= 1 and out["val"]["images"] >= 3
        assert out["registered"] == {"project": project, "version": "v0001", "path": str(env / "models" / project / "v0001"),
                                     "current": True}
        assert (env / "train-report" / "report.md").is_file()
        meta = json.loads((env / "models" / project / "v0001" / "meta.json").read_text())
        assert meta["classes"] == list(CLASSES) and "map50_95" in meta["metrics"]

        from backend.core.registry import ModelRegistry

        registry = ModelRegistry(env / "models", client)
        registry.promote(project, registry.add_version(project, make_checkpoint(env / "v2.pt", list(CLASSES)),
                                                       {"classes": list(CLASSES)}).version)
        code, out, _ = lsb(capsys, "versions", "--project", project)
        assert code == 0 and [(v["version"], v["current"]) for v in out] == [("v0001", False), ("v0002", True)]
        code, out, _ = lsb(capsys, "rollback", "--project", project)
        assert code == 0 and out["version"] == "v0001" and registry.current_version(project) == "v0001"
        code, _, err = lsb(capsys, "rollback", "--project", project)
        assert code == 1 and "no version before" in err
    finally:
        for key in client.scan_iter(f"lsb:model:{project}:*"):
            client.delete(key)
    code, _, err = lsb(capsys, "train", "--data", env / "photos")
    assert code == 2 and "data.yaml" in err


# --- the whole chain on the real photos ultralytics ships -------------------------------------------

def test_gemini_on_real_images_then_export_and_eval(env, capsys, monkeypatch):
    truth = {"bus.jpg": [((22, 228, 805, 756), "bus"), ((48, 398, 246, 904), "person"), ((670, 380, 810, 878), "person")],
             "zidane.jpg": [((122, 42, 1150, 716), "person"), ((747, 40, 1140, 712), "person")]}
    oracle = fg.Oracle()
    for name, objects in truth.items():
        with Image.open(ASSETS / name) as im:
            oracle.add(im.convert("RGB"), objects)
    with fg.FakeGemini(responder=oracle) as fake:
        monkeypatch.setenv("GEMINI_API_KEY", fg.DEFAULT_KEY)
        monkeypatch.setenv("GEMINI_BASE_URL", fake.base_url)
        code, summary, err = lsb(capsys, "detect", ASSETS, "--source", "gemini", "--labels", "person,bus", "--out",
                                 env / "drafts")
    assert code == 0, err
    assert summary["done"] == 2 and summary["objects"] == 5
    for name, objects in truth.items():
        det = results.from_json(json.loads((env / "drafts" / Path(name).with_suffix(".json")).read_text()))
        assert sorted(det.labels) == sorted(label for _, label in objects)
        iou = geometry.box_iou(det.xyxy, np.array([box for box, _ in objects], dtype=float))
        assert np.all(iou.max(axis=1) > 0.97)  # Gemini's 0-1000 grid costs about a pixel
        assert det.meta["usage"]["prompt_tokens"] > 0

    code, summary, _ = lsb(capsys, "export", "ls", env / "drafts", "--out", env / "tasks.json", "--document-root", ASSETS.parent)
    tasks = json.loads((env / "tasks.json").read_text())
    assert code == 0 and sorted(t["data"]["image"] for t in tasks) == ["/data/local-files/?d=assets/bus.jpg",
                                                                       "/data/local-files/?d=assets/zidane.jpg"]
    xml = json.loads((env / "drafts" / "bus.json").read_text())["label_config"]
    assert all(LabelInterface(xml).validate_prediction(t["predictions"][0], return_errors=True) == [] for t in tasks)

    code, _, _ = lsb(capsys, "export", "coco", env / "drafts", "--out", env / "coco.json")
    assert code == 0
    code, summary, err = lsb(capsys, "eval", "--truth", env / "coco.json", "--images", ASSETS, "--predictions", env / "drafts",
                             "--out", env / "rep")
    assert code == 0, err
    assert summary["map50"] == 1.0 and summary["images"] == 2
