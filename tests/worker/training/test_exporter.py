"""ONNX / OpenVINO exports: made offline, checked box by box against the .pt, served first, never fatal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from backend.core.label_config import ProjectConfig
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.detectors.yolo import INT8_FORMAT, YoloDetector, export_metadata, model_format
from backend.serving.hotswap import ModelHolder
from tests.models import make_checkpoint
from tests.paths import ROOT
from tests.synthetic import label_config, make_images
from tests.worker_fixtures import GOOD_MODEL, good_model
from worker.training.exporter import _Boxes, compare_boxes, export_and_check, export_int8, export_verified
from worker.training.gate import held_out_metrics

CLASSES = ["Car", "Person"]
IMGSZ = 96
# A random-init model scores every box ~0.004: a threshold under that gives boxes to compare.
CONF = 0.001


@pytest.fixture(scope="module")
def samples():
    return [item.image for item in make_images(4, seed=5, size=(128, 96))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export-ckpt") / "m.pt", CLASSES, seed=3)


@pytest.fixture(scope="module")
def report(tmp_path_factory, checkpoint, samples):
    return export_and_check(checkpoint, tmp_path_factory.mktemp("exports"), samples, IMGSZ, conf=CONF)


# --- the agreement rule ------------------------------------------------------------------------------

def _b(xyxy, cls, conf) -> _Boxes:
    return _Boxes(np.array(xyxy, dtype=float).reshape(-1, 4), np.array(cls, dtype=int), np.array(conf, dtype=float))


def test_identical_boxes_agree():
    a = _b([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1], [0.9, 0.5])
    out = compare_boxes([a], [a], conf=0.25)
    assert out["ok"] and out["matched"] == 2 and out["min_iou"] == pytest.approx(1.0)


def test_a_shifted_box_fails_the_iou_bar():
    a = _b([[10, 10, 50, 50]], [0], [0.9])
    b = _b([[12, 10, 52, 50]], [0], [0.9])  # IoU ~0.9
    out = compare_boxes([a], [b], conf=0.25)
    assert not out["ok"] and "IoU" in out["failures"][0]


def test_a_missing_confident_box_fails_but_a_threshold_flip_does_not():
    a = _b([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1], [0.9, 0.26])
    b = _b([[10, 10, 50, 50]], [0], [0.9])
    assert compare_boxes([a], [b], conf=0.25)["ok"]  # 0.26 is within the margin of the 0.25 threshold
    c = _b([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1], [0.9, 0.8])
    out = compare_boxes([c], [b], conf=0.25)
    assert not out["ok"] and "missing" in out["failures"][0]
    out = compare_boxes([b], [c], conf=0.25)
    assert not out["ok"] and "extra" in out["failures"][0]


def test_boxes_of_another_class_do_not_match():
    a = _b([[10, 10, 50, 50]], [0], [0.9])
    b = _b([[10, 10, 50, 50]], [1], [0.9])
    assert not compare_boxes([a], [b], conf=0.25)["ok"]


def test_scores_must_agree_too():
    a = _b([[10, 10, 50, 50]], [0], [0.9])
    b = _b([[10, 10, 50, 50]], [0], [0.7])
    assert not compare_boxes([a], [b], conf=0.25)["ok"]


# --- real exports --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_both_exports_pass_and_agree_with_the_pt(report):
    assert set(report.passed) == {"onnx", "openvino"}, {f: c.reason for f, c in report.checks.items()}
    onnx, openvino = report.passed["onnx"], report.passed["openvino"]
    assert onnx.name == "model.onnx" and onnx.is_file()
    assert openvino.name == "model_openvino_model" and any(openvino.glob("*.xml"))
    for check in report.checks.values():
        assert check.matched > 0 and check.min_iou >= 0.99  # boxes were really compared
        assert check.boxes_pt == check.boxes_export
    assert not list(onnx.parent.glob(".export-*"))  # staging cleaned up
    meta = report.to_meta()
    assert meta["passed"] == ["onnx", "openvino"]


@pytest.mark.slow
def test_real_predictions_agree_and_a_moved_or_lost_box_is_caught(checkpoint, samples, report):
    from worker.training.exporter import _predict

    pt_boxes, _ = _predict(YoloDetector(checkpoint, "pt", imgsz=IMGSZ), samples, CONF)
    onnx_boxes, _ = _predict(YoloDetector(report.passed["onnx"], "onnx", imgsz=IMGSZ), samples, CONF)
    assert sum(len(b.cls) for b in pt_boxes) > 0
    assert compare_boxes(pt_boxes, onnx_boxes, CONF)["ok"]
    moved = [_Boxes(b.xyxy + [2.0, 0.0, 2.0, 0.0], b.cls, b.conf) for b in onnx_boxes]
    assert not compare_boxes(pt_boxes, moved, CONF)["ok"]
    lost = [_Boxes(b.xyxy[1:], b.cls[1:], b.conf[1:]) for b in onnx_boxes]
    assert not compare_boxes(pt_boxes, lost, CONF, score_margin=0.0)["ok"]


@pytest.mark.slow
def test_a_missing_package_fails_only_that_format(tmp_path, checkpoint, samples, monkeypatch):
    import worker.training.exporter as export

    monkeypatch.setitem(export._PACKAGES, "openvino", ("openvino", "no_such_package_xyz"))
    out = export_verified(checkpoint, tmp_path, samples, IMGSZ, formats=("openvino",), conf=CONF)
    assert out == {}
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_detector_serves_an_export_like_the_pt(report, checkpoint, samples):
    config = ProjectConfig.parse(label_config(CLASSES))
    pt = YoloDetector(checkpoint, "v1", imgsz=IMGSZ)
    for fmt, path in report.passed.items():
        assert model_format(path) == fmt
        assert export_metadata(path)["imgsz"] == [IMGSZ, IMGSZ]
        det = YoloDetector(path, "v1")
        assert det.format == fmt and det.names == pt.names and det._imgsz == IMGSZ
        det.warm_up()
        ours, theirs = det.detect_batch(samples, config, CONF), pt.detect_batch(samples, config, CONF)
        assert [d.labels for d in ours] == [d.labels for d in theirs]
        for a, b in zip(ours, theirs):
            assert np.allclose(a.xyxy, b.xyxy, atol=0.5) and a.source == "yolo"
        if fmt == "openvino":  # never OpenVINO's bf16 default (it moves boxes on CPUs that have bf16)
            import openvino as ov

            compiled = det._model.predictor.model.backend.ov_compiled_model
            assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def _holder(tmp_path, redis_url):
    settings = Settings(model_dir=tmp_path / "models", redis_url=redis_url, hotswap_poll_seconds=0.2)
    registry = ModelRegistry(settings.model_dir, redis.Redis.from_url(redis_url))
    return ModelHolder(settings, registry), registry


@pytest.mark.slow
def test_hotswap_serves_openvino_then_onnx_then_the_pt(tmp_path, redis_url, checkpoint, report):
    holder, registry = _holder(tmp_path, redis_url)
    project = str(910000 + uuid.uuid4().int % 9999)
    try:
        info = registry.add_version(project, checkpoint, {"classes": CLASSES}, extra_files=report.passed)
        assert info.export("openvino") is not None and info.export("onnx") is not None
        registry.promote(project, info.version)
        assert holder.get(project).format == "openvino"

        # A broken OpenVINO folder: the ONNX file serves instead.
        broken = registry.add_version(project, checkpoint, {"classes": CLASSES}, extra_files=report.passed)
        for f in broken.export("openvino").glob("*.bin"):
            f.write_bytes(b"garbage")
        assert holder._load(broken.checkpoint, broken.version).format == "onnx"

        # Both broken: the .pt, never an error.
        broken.export("onnx").write_bytes(b"not onnx")
        assert holder._load(broken.checkpoint, broken.version).format == "pt"

        # Exports listed in meta.json but gone from disk: the .pt.
        gone = registry.add_version(project, checkpoint, {"classes": CLASSES}, extra_files=report.passed)
        shutil.rmtree(gone.export("openvino"))
        (gone.path / "model.onnx").unlink()
        assert holder._load(gone.checkpoint, gone.version).format == "pt"
    finally:
        holder.stop()


def test_version_without_exports_and_fixed_model_serve_the_pt(tmp_path, redis_url, checkpoint):
    holder, registry = _holder(tmp_path, redis_url)
    project = str(920000 + uuid.uuid4().int % 9999)
    try:
        info = registry.add_version(project, checkpoint, {})
        assert holder._load(info.checkpoint, info.version).format == "pt"
    finally:
        holder.stop()
    fixed = ModelHolder(Settings(model_dir=tmp_path / "m2", redis_url=redis_url, yolo_model=str(checkpoint)),
                        ModelRegistry(tmp_path / "m2", None))
    assert fixed.get("1").format == "pt"


def test_model_format_names():
    assert model_format("a/model.pt") == "pt"
    assert model_format("a/model.onnx") == "onnx"
    assert model_format("a/model_openvino_model") == "openvino"
    with pytest.raises(ValueError):
        model_format("a/model.engine")


# Run in a fresh process: OpenVINO's TBB workers are born with the first OpenVINO model of a process,
# and the export fixtures of this module have already made them here.
_SWAP_IN_A_FRESH_PROCESS = r"""
import json, sys
from pathlib import Path
from backend.detectors import yolo
from backend.core.label_config import ProjectConfig
from PIL import Image
from tests.paths import ROOT

def threads():
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[16]), int(fields[11]) + int(fields[12]))
    return out

lowered = []
original = yolo._lowest_priority_for_this_thread
yolo._lowest_priority_for_this_thread = lambda: (lowered.append(1), original())
checkpoint, export, config = Path(sys.argv[1]), {"openvino": Path(sys.argv[2])}, ProjectConfig.parse(sys.argv[3])
first = yolo.YoloDetector.load(checkpoint, "v1", export)
lowered_first, lowered[:] = list(lowered), []
swapped = yolo.YoloDetector.load(checkpoint, "v2", export)
images = [Image.new("RGB", (128, 96), (90, 120, 150))] * 4
before = threads()
for _ in range(150):
    swapped.detect_batch(images, config, 0.001)
after = threads()
busy = {tid: nice for tid, (nice, ticks) in after.items() if ticks - before.get(tid, (0, 0))[1] >= 5}
print(json.dumps({"formats": [first.format, swapped.format], "lowered": [lowered_first, lowered],
                  "busy_nice": sorted(busy.values())}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_swapped_in_openvino_model_warms_up_at_low_priority_and_serves_at_normal(report, checkpoint):
    """During a hot-swap the new OpenVINO model compiles at nice 19 (the serving model keeps the cores),
    yet every thread that runs its inferences is at nice 0: the process's first OpenVINO model, whose
    warm-up gives birth to OpenVINO's worker threads, warms up at normal priority."""
    proc = subprocess.run([sys.executable, "-c", _SWAP_IN_A_FRESH_PROCESS, str(checkpoint), str(report.passed["openvino"]),
                           label_config(CLASSES)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["formats"] == ["openvino", "openvino"]
    assert out["lowered"] == [[], [1]], "only the swapped-in model should warm up at nice 19, and only its warm-up"
    assert out["busy_nice"] and set(out["busy_nice"]) == {0}, f"inference ran on threads at nice {out['busy_nice']}"


# --- INT8: judged by held-out mAP, not by boxes ---------------------------------------------------------

@pytest.fixture(scope="module")
def calibration_yaml(tmp_path_factory, samples):
    """A dataset yaml whose training split holds the sample images (calibration needs no labels)."""
    root = tmp_path_factory.mktemp("calibration")
    (root / "images" / "train").mkdir(parents=True)
    for i, image in enumerate(samples):
        image.save(root / "images" / "train" / f"{i}.png")
    data = root / "data.yaml"
    data.write_text(json.dumps({"path": str(root), "train": "images/train", "val": "images/train",
                                "names": dict(enumerate(CLASSES))}))
    return data


def test_an_int8_export_failing_its_accuracy_check_is_kept_out(tmp_path, checkpoint, calibration_yaml):
    scored: list[Path] = []

    def score(path: Path) -> float:
        scored.append(path)
        return 0.5

    check = export_int8(checkpoint, tmp_path, calibration_yaml, IMGSZ, score, reference=0.5, max_drop=-1.0)
    assert [p.name for p in scored] == ["model_int8_openvino_model"], "the INT8 model was exported and scored"
    assert check.calibration_images == 4 and check.map50_95 == 0.5 and check.export_s > 0
    assert not check.ok and check.path is None and "below the .pt's" in check.reason
    assert list(tmp_path.iterdir()) == [], "a rejected export (and its staging) is deleted"


@pytest.mark.slow
def test_an_int8_export_within_a_point_of_the_pt_is_kept_and_served_first(tmp_path, redis_url):
    good = good_model()
    dataset, config, reference = good["dataset"], good["config"], good["metrics"]["map50_95"]
    check = export_int8(good["checkpoint"], tmp_path / "exports", dataset.data_yaml, GOOD_MODEL["imgsz"],
                        lambda path: held_out_metrics(path, dataset, config)["map50_95"], reference)
    assert check.ok, check.reason
    assert check.calibration_images == len(dataset.train_ids) and check.map50_95_pt == pytest.approx(reference)
    assert check.map50_95 >= reference - 0.01
    assert Path(check.path).name == "model_int8_openvino_model" and Path(check.path).is_dir()

    holder, registry = _holder(tmp_path, redis_url)
    project = str(930000 + uuid.uuid4().int % 9999)
    try:
        info = registry.add_version(project, good["checkpoint"], {}, extra_files={INT8_FORMAT: Path(check.path)})
        registry.promote(project, info.version)
        served = holder.get(project)
        assert served.format == "openvino" and served.path.name == "model_int8_openvino_model"
        no_int8 = ModelHolder(Settings(model_dir=registry.model_dir, redis_url=redis_url, yolo_serve_int8=False), registry)
        assert no_int8._load(info.checkpoint, info.version).format == "pt"
    finally:
        holder.stop()
