"""What benchmarks run on: synthetic images and YOLO datasets, a trained checkpoint and its verified
exports (cached under var/bench/cache), tasks for the fake Label Studio, fake Gemini answers, registry versions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import CACHE, CLASSES, ROOT, TRAIN_ENV, Context, package_version


def synthetic(n: int, seed: int, size: tuple[int, int] = (320, 240), max_objects: int = 3):
    from tests.synthetic import make_images

    return make_images(n, seed=seed, size=size, max_objects=max_objects)


def write_yolo_dataset(root: Path, train, val, classes: Sequence[str] = CLASSES) -> Path:
    """A YOLO detection dataset (images/, labels/, data.yaml with an absolute path) from synthetic images."""
    from backend.core.geometry import xyxy_to_yolo

    for split, items in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            item.image.save(root / "images" / split / f"{i:05d}.jpg", quality=95)
            lines = []
            for box in item.boxes:
                cx, cy, w, h = xyxy_to_yolo(box.xyxy, item.width, item.height)
                lines.append(f"{list(classes).index(box.label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def train_in_subprocess(data_yaml: Path, out_json: Path, log_path: Path, *, epochs: int | None = None,
                        time_min: float | None = None, imgsz: int | None = None, batch: int | None = None,
                        extra: dict | None = None, data_dir: Path | None = None, env: dict | None = None,
                        nice: int = 0, base_model: str | None = None) -> dict:
    """Run ``bench.train_child`` (worker.training.trainer.train at the given settings) in a child process.

    Returns its JSON result plus ``wall_s`` and ``peak_rss_mb`` (the child's ru_maxrss, from wait4).
    """
    cmd = [sys.executable, "-m", "bench.train_child", "--data", str(data_yaml), "--out", str(out_json),
           "--data-dir", str(data_dir or out_json.parent)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if time_min is not None:
        cmd += ["--time-min", str(time_min)]
    if imgsz is not None:
        cmd += ["--imgsz", str(imgsz)]
    if batch is not None:
        cmd += ["--batch", str(batch)]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    if base_model:
        cmd += ["--base-model", base_model]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"training child failed ({proc.returncode}); log {log_path}:\n{log_path.read_text()[-2000:]}")
    result = json.loads(out_json.read_text())
    result["wall_s"] = wall
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0
    return result


def cached_training(ctx: Context, name: str, params: dict, items, *, train_share: float,
                    classes: Sequence[str] = CLASSES) -> Path:
    """Train once on ``items()`` (split ``train_share`` / rest) with ``params`` (epochs, time_min, imgsz) and keep
    the checkpoint at var/bench/cache/<name>-<hash of params>/model.pt; later runs with the same params reuse it."""
    import hashlib

    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = CACHE / f"{name}-{key}" / "model.pt"
    if target.is_file():
        return target
    ctx.log(f"training the {name} once ({params}); cached at {target}")
    work = ctx.tmp(name)
    images = items()
    cut = int(len(images) * train_share)
    data = write_yolo_dataset(work / "data", images[:cut], images[cut:], classes)
    result = train_in_subprocess(data, work / "result.json", work / "train.log", epochs=params["epochs"],
                                 time_min=params["time_min"], imgsz=params["imgsz"], data_dir=work, env=TRAIN_ENV)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(result["checkpoint"], tmp)
    os.replace(tmp, target)
    (target.parent / "train.json").write_text(json.dumps(result, indent=2, default=str))
    return target


def trained_checkpoint(ctx: Context) -> Path:
    """A small detector trained on synthetic shapes at imgsz 320, cached under var/bench/cache.

    Inference benchmarks need a model that finds a realistic handful of boxes (a random one finds
    none, or thousands). Full: 96 train / 24 held-out images, 30 epochs, nbs = batch (about 2 min
    on an idle machine); quick: 48 images, 4 epochs (finds nothing: a smoke test only).
    Cached by those parameters and the Ultralytics version, so only the first run pays.
    """
    params = {"n": ctx.pick(120, 48), "time_min": None, "epochs": ctx.pick(30, 4), "imgsz": 320,
              "ultralytics": package_version("ultralytics"), "v": 1}
    return cached_training(ctx, "checkpoint", params, lambda: synthetic(params["n"], seed=101), train_share=0.8)


def label_config() -> str:
    from tests.synthetic import label_config as make

    return make(CLASSES)


def upload_tasks(ls, project: int, images) -> list[dict]:
    """Upload images to the fake Label Studio; the tasks as Label Studio sends them to /predict."""
    tasks = []
    for i, item in enumerate(images):
        url = ls.add_file(project, item.encode("PNG"))
        tasks.append({"id": 10_000 + len(ls.files) * 10 + i, "data": {"image": url}, "project": project})
    return tasks


def predict_body(tasks: list[dict], project: str) -> dict:
    return {"tasks": tasks, "project": f"{project}.1700000000", "label_config": label_config(), "params": {}}


def oracle():
    """The fake Gemini's eyes: finds the synthetic shapes by colour (~15 ms of CPU per call)."""
    from tests.fake_gemini import Oracle
    from tests.synthetic import colour

    return Oracle(colors={c: colour(c) for c in CLASSES})


FIXED_OBJECTS = [
    {"box_2d": [120, 80, 430, 390], "label": "Car"},
    {"box_2d": [500, 550, 880, 760], "label": "Person"},
    {"box_2d": [90, 700, 600, 840], "label": "Sign"},
]


def fixed_answer(latency: float = 0.0):
    """A fake Gemini responder answering three boxes after ``latency`` seconds, whatever the image.

    Throughput benchmarks use it instead of :func:`oracle`: the fake runs on the same two cores as
    the backend, and the real Gemini's work happens on Google's machines, so the fake must cost
    next to nothing (~2 ms of CPU per call, decoding the request) for the figures to be about the backend.
    """
    from tests import fake_gemini as fg

    answer = fg.boxes(FIXED_OBJECTS)
    return lambda request: fg.delayed(answer, latency) if latency else answer


def register_version(ctx: Context, model_dir: Path, project: str, checkpoint: Path, promote: bool = True,
                     exports: dict[str, Path] | None = None):
    from backend.core.registry import ModelRegistry

    registry = ModelRegistry(model_dir, ctx.redis())
    info = registry.add_version(project, checkpoint, {"classes": list(CLASSES), "imgsz": 320}, extra_files=exports)
    if promote:
        registry.promote(project, info.version)
    return registry, info


def verified_exports(ctx: Context, checkpoint: Path, fresh: bool = False) -> tuple[dict[str, Path], dict]:
    """ONNX and OpenVINO exports of ``checkpoint`` that passed ``worker.training.exporter``'s check (cached beside it)."""
    from worker.training.exporter import export_and_check

    out = checkpoint.parent / "exports"
    report_file = out / "report.json"
    if not fresh and report_file.is_file():
        report = json.loads(report_file.read_text())
        exports = {fmt: Path(report["checks"][fmt]["path"]) for fmt in report["passed"]}
        if all(p.exists() for p in exports.values()):
            return exports, report
    if out.exists():
        shutil.rmtree(out)
    samples = [item.image for item in synthetic(8, seed=4242)]
    report = export_and_check(checkpoint, out, samples, 320)
    meta = report.to_meta()
    report_file.write_text(json.dumps(meta, indent=2, default=str))
    return report.passed, meta
