"""Export a promoted checkpoint to ONNX and OpenVINO, offline, and keep only exports that agree with it.

Serving prefers a version's exports (``EXPORT_FORMATS``: OpenVINO, then ONNX) because they run
several times faster than PyTorch on CPU. An export is only worth serving if it draws the same
boxes, so every export is checked against the ``.pt`` on a few sample images (the held-out images
of the training that produced it):

- both models predict through the serving detector (:class:`backend.detectors.yolo.YoloDetector`,
  loaded and warmed up as serving does: an OpenVINO export compiled in f32) at the same ``imgsz``
  and confidence threshold;
- boxes are matched per image and class, best IoU first; every matched pair needs IoU >= ``min_iou``
  (0.99) and scores within ``max_score_diff``;
- a box only one side found fails the check unless its score is within ``score_margin`` of the
  threshold (a 0.251 vs 0.249 flip is rounding, not a different model);
- the export must carry the same class names.

Exports are dynamic-shape (``dynamic=True``), so Ultralytics letterboxes them exactly like the
``.pt`` (minimal rectangle, not the full square): same pixels in, same boxes out, and fewer pixels
to process. Nothing is downloaded: ``onnx``, ``onnxslim``, ``onnxruntime`` and ``openvino`` must be
installed (``YOLO_AUTOINSTALL=0``); a missing package fails that format only.

Hooking it into training (``worker.jobs.training``, at promotion)::

    exports = export_verified(trained.checkpoint, export_dir, [i.image_path for i in dataset.val_items[:8]], imgsz)
    info = registry.add_version(project, trained.checkpoint, meta, extra_files=exports)

INT8 (:func:`export_int8`): an INT8 OpenVINO model, quantized post-training by NNCF exactly as
Ultralytics' ``quantize=8`` export does (calibrated on the training split of the dataset's ``data.yaml``,
at most ``INT8_CALIBRATION_IMAGES`` images; see docs/ultralytics.md#int8-openvino). A quantized model
never draws the same boxes, so the IoU >= 0.99 rule would always reject it: it is judged instead by
mAP50-95 on the held-out tasks, through the one evaluation and the one inference path, and kept only
when it loses at most ``max_drop`` (0.01) against the ``.pt``. Either way the outcome and the reason
go to the version's meta (``export_checks``).

``python -m worker.training.exporter CHECKPOINT OUT_DIR IMAGE...`` runs it by hand and prints the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.core import ultralytics_env
from backend.core.detections import Detections
from backend.core.geometry import box_iou
from backend.core.ultralytics_env import EXPORT_FORMATS
from backend.detectors.yolo import INT8_FORMAT, YoloDetector

log = logging.getLogger(__name__)

INT8_CALIBRATION_IMAGES = 300  # what Ultralytics recommends; small projects calibrate on every training image

_PACKAGES = {"onnx": ("onnx", "onnxslim", "onnxruntime"), "openvino": ("openvino",)}
STEM = "model"  # exports are named after the checkpoint copy: model.onnx, model_openvino_model/


@dataclass
class FormatCheck:
    """How one format fared: exported, loaded, and agreeing with the .pt (``ok``)."""

    fmt: str
    ok: bool = False
    path: str | None = None
    reason: str = ""
    export_s: float = 0.0
    images: int = 0
    boxes_pt: int = 0
    boxes_export: int = 0
    matched: int = 0
    min_iou: float | None = None
    max_score_diff: float | None = None
    pt_ms_per_image: float | None = None
    export_ms_per_image: float | None = None
    map50_95_pt: float | None = None  # INT8 only: held-out mAP50-95 of the .pt and of the export
    map50_95: float | None = None
    max_drop: float | None = None
    calibration_images: int | None = None


@dataclass
class ExportReport:
    checkpoint: str
    imgsz: int
    conf: float
    min_iou: float
    checks: dict[str, FormatCheck] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> dict[str, Path]:
        return {fmt: Path(c.path) for fmt, c in self.checks.items() if c.ok and c.path}

    def to_meta(self) -> dict[str, Any]:
        """JSON-safe summary for the version's meta.json."""
        data = asdict(self)
        data["passed"] = sorted(self.passed)
        return data


# --- box agreement ---------------------------------------------------------------------------------

@dataclass
class _Boxes:
    xyxy: np.ndarray
    cls: np.ndarray
    conf: np.ndarray


def _boxes(detections: Detections, class_ids: dict[str, int]) -> _Boxes:
    """A detector's boxes with its class names turned back into the model's class ids."""
    return _Boxes(np.asarray(detections.xyxy, dtype=float).reshape(-1, 4),
                  np.array([class_ids[label] for label in detections.labels], dtype=int),
                  np.asarray(detections.scores, dtype=float))


def compare_boxes(ref: Sequence[_Boxes], test: Sequence[_Boxes], conf: float, min_iou: float = 0.99,
                  score_margin: float = 0.02, max_score_diff: float = 0.02) -> dict[str, Any]:
    """Agreement of two models' boxes on the same images (see the module docstring for the rules)."""
    failures: list[str] = []
    matched, ious, diffs = 0, [], []
    for index, (a, b) in enumerate(zip(ref, test)):
        used = np.zeros(len(b.cls), dtype=bool)
        overlap = box_iou(a.xyxy, b.xyxy) if len(a.cls) and len(b.cls) else np.zeros((len(a.cls), len(b.cls)))
        for i in np.argsort(-a.conf, kind="stable"):
            candidates = np.where(used | (b.cls != a.cls[i]), -1.0, overlap[i]) if len(b.cls) else np.zeros(0)
            j = int(np.argmax(candidates)) if len(candidates) else -1
            if j < 0 or candidates[j] <= 0.5:
                if a.conf[i] >= conf + score_margin:
                    failures.append(f"image {index}: a class {a.cls[i]} box (score {a.conf[i]:.3f}) missing from the export")
                continue
            used[j] = True
            matched += 1
            ious.append(float(candidates[j]))
            diffs.append(abs(float(a.conf[i]) - float(b.conf[j])))
            if candidates[j] < min_iou:
                failures.append(f"image {index}: IoU {candidates[j]:.4f} < {min_iou}")
            if diffs[-1] > max_score_diff:
                failures.append(f"image {index}: score {a.conf[i]:.3f} vs {b.conf[j]:.3f}")
        for j in np.flatnonzero(~used):
            if b.conf[j] >= conf + score_margin:
                failures.append(f"image {index}: an extra class {b.cls[j]} box (score {b.conf[j]:.3f}) in the export")
    return {
        "ok": not failures,
        "failures": failures,
        "boxes_pt": int(sum(len(a.cls) for a in ref)),
        "boxes_export": int(sum(len(b.cls) for b in test)),
        "matched": matched,
        "min_iou": round(min(ious), 6) if ious else None,
        "max_score_diff": round(max(diffs), 6) if diffs else None,
    }


# --- export ----------------------------------------------------------------------------------------

def _images(samples: Iterable[Any]) -> list[Image.Image]:
    out = []
    for sample in samples:
        if isinstance(sample, Image.Image):
            out.append(sample.convert("RGB"))
        elif isinstance(sample, np.ndarray):
            out.append(Image.fromarray(sample).convert("RGB"))
        else:
            with Image.open(sample) as im:
                out.append(im.convert("RGB"))
    return out


def _missing_packages(fmt: str) -> list[str]:
    return [p for p in _PACKAGES.get(fmt, ()) if importlib.util.find_spec(p) is None]


def _predict(detector: YoloDetector, images: list[Image.Image], conf: float) -> tuple[list[_Boxes], float]:
    """Boxes per image (one image at a time, like a 1-task /predict) and the median ms per image.

    The detector is warmed up first, as the hot-swap loader does before a model serves.
    """
    detector.warm_up()
    detector.detect_model_classes(images[:1], conf)  # the first call at the samples' shape is not timed
    class_ids = {name: int(k) for k, name in detector.names.items()}
    out, times = [], []
    for image in images:
        started = time.perf_counter()
        detections = detector.detect_model_classes([image], conf)[0]
        times.append(time.perf_counter() - started)
        out.append(_boxes(detections, class_ids))
    return out, round(float(np.median(times)) * 1000, 2) if times else 0.0


def export_and_check(checkpoint: Path | str, out_dir: Path | str, sample_images: Iterable[Any], imgsz: int,
                     formats: Sequence[str] = EXPORT_FORMATS, conf: float = 0.25, min_iou: float = 0.99) -> ExportReport:
    """Export ``checkpoint`` to each format under ``out_dir`` and check it; failed exports are deleted.

    Passed exports are ``out_dir/model.onnx`` and ``out_dir/model_openvino_model/`` (the names the
    registry keeps and ``backend.detectors.yolo.model_format`` recognises).
    """
    ultralytics_env.prepare()
    import torch  # heavy: the worker imports this module only when a promotion exports
    from ultralytics import YOLO  # heavy: ultralytics, with torch above

    started = time.monotonic()
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExportReport(str(checkpoint), int(imgsz), float(conf), float(min_iou))
    images = _images(sample_images)
    threads = torch.get_num_threads()
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        weights = staging / f"{STEM}.pt"
        shutil.copyfile(checkpoint, weights)
        reference = YoloDetector(weights, "export-check", imgsz=int(imgsz))
        pt_names = dict(reference.names)
        pt_boxes, pt_ms = _predict(reference, images, conf)
        for fmt in formats:
            check = FormatCheck(fmt, images=len(images), pt_ms_per_image=pt_ms)
            report.checks[fmt] = check
            missing = _missing_packages(fmt)
            if missing:
                check.reason = f"missing package(s): {', '.join(missing)}"
                log.warning("export %s skipped: %s", fmt, check.reason)
                continue
            t = time.monotonic()
            try:
                kwargs: dict[str, Any] = {"format": fmt, "imgsz": int(imgsz), "dynamic": True, "half": False,
                                          "int8": False, "nms": False, "batch": 1, "device": "cpu", "verbose": False}
                if fmt == "onnx":
                    kwargs["simplify"] = True
                produced = Path(YOLO(str(weights)).export(**kwargs))
            except Exception as exc:
                check.reason = f"export failed: {type(exc).__name__}: {exc}"[:500]
                log.warning("export %s of %s failed: %s", fmt, checkpoint, check.reason)
                continue
            finally:
                ultralytics_env.restore_torch_threads(threads)  # the exporter's select_device() lowers it
            check.export_s = round(time.monotonic() - t, 2)
            try:
                exported = YoloDetector(produced, "export-check", imgsz=int(imgsz), task="detect")
                names = dict(exported.names)
                boxes, ms = _predict(exported, images, conf)
            except Exception as exc:
                check.reason = f"export does not load or predict: {type(exc).__name__}: {exc}"[:500]
                log.warning("export %s of %s unusable: %s", fmt, checkpoint, check.reason)
                continue
            check.export_ms_per_image = ms
            if {int(k): str(v) for k, v in names.items()} != {int(k): str(v) for k, v in pt_names.items()}:
                check.reason = f"class names differ: {names} vs {pt_names}"
                continue
            agreement = compare_boxes(pt_boxes, boxes, conf, min_iou)
            for key in ("boxes_pt", "boxes_export", "matched", "min_iou", "max_score_diff"):
                setattr(check, key, agreement[key])
            if not agreement["ok"]:
                check.reason = "boxes differ: " + "; ".join(agreement["failures"][:5])
                log.warning("export %s of %s rejected: %s", fmt, checkpoint, check.reason)
                continue
            target = out_dir / produced.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(produced), target)
            check.ok, check.path = True, str(target)
            check.reason = "" if agreement["boxes_pt"] else "no boxes on the sample images: agreement not tested"
            log.info("export %s of %s verified: %d boxes matched, min IoU %s, %.1f ms/image vs %.1f for the .pt",
                     fmt, checkpoint.name, check.matched, check.min_iou, ms, pt_ms)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        ultralytics_env.restore_torch_threads(threads)  # an export's detector runs torch on 1 thread
    report.seconds = round(time.monotonic() - started, 2)
    return report


def export_verified(checkpoint: Path | str, out_dir: Path | str, sample_images: Iterable[Any], imgsz: int,
                    formats: Sequence[str] = EXPORT_FORMATS, conf: float = 0.25, min_iou: float = 0.99) -> dict[str, Path]:
    """``{format: path}`` of the exports that passed (see :func:`export_and_check`).

    Never raises: exports are an optimisation, and a promotion must not fail for one.
    """
    try:
        return export_and_check(checkpoint, out_dir, sample_images, imgsz, formats, conf, min_iou).passed
    except Exception:
        log.exception("exporting %s failed; the version will be served from its .pt", checkpoint)
        return {}


# --- INT8 ------------------------------------------------------------------------------------------

def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def export_int8(checkpoint: Path | str, out_dir: Path | str, data_yaml: Path | str, imgsz: int,
                score: Callable[[Path], float], reference: float, max_drop: float = 0.01,
                calibration_images: int = INT8_CALIBRATION_IMAGES) -> FormatCheck:
    """Quantize ``checkpoint`` to INT8 OpenVINO and keep it (``out_dir/model_int8_openvino_model``) only if
    ``score(export)`` (held-out mAP50-95) >= ``reference`` (the .pt's) - ``max_drop``; never raises.
    """
    check = FormatCheck(INT8_FORMAT, map50_95_pt=round(float(reference), 6), max_drop=float(max_drop))
    missing = [p for p in ("openvino", "nncf") if importlib.util.find_spec(p) is None]
    if missing:
        check.reason = f"missing package(s): {', '.join(missing)}"
        log.warning("INT8 export skipped: %s", check.reason)
        return check
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-int8-", dir=out_dir))
    threads = 0
    try:
        ultralytics_env.prepare()
        import torch  # heavy: the worker imports this module only when a promotion exports
        from ultralytics import YOLO  # heavy: ultralytics, with torch above
        from ultralytics.data.utils import check_det_dataset  # heavy: same

        threads = torch.get_num_threads()
        train_dir = Path(check_det_dataset(str(data_yaml))["train"])
        n_train = _count_images(train_dir) if train_dir.is_dir() else 0
        if n_train < 1:
            raise ValueError(f"no training images under {train_dir} to calibrate on")
        check.calibration_images = min(n_train, int(calibration_images))
        weights = staging / f"{STEM}.pt"
        shutil.copyfile(checkpoint, weights)
        started = time.monotonic()
        # split=train: calibrate on the training images, never the held-out ones that judge the result
        produced = Path(YOLO(str(weights)).export(
            format="openvino", quantize=8, data=str(data_yaml), split="train",
            fraction=min(1.0, check.calibration_images / n_train), imgsz=int(imgsz), dynamic=True, batch=1,
            nms=False, device="cpu", verbose=False))
        ultralytics_env.restore_torch_threads(threads)
        check.export_s = round(time.monotonic() - started, 2)
        check.map50_95 = round(float(score(produced)), 6)
        if check.map50_95 < reference - max_drop:
            check.reason = (f"held-out mAP50-95 {check.map50_95:.4f} is more than {max_drop} below the .pt's "
                            f"{reference:.4f}")
            log.warning("INT8 export of %s rejected: %s", checkpoint, check.reason)
            return check
        target = out_dir / produced.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(produced), target)
        check.ok, check.path = True, str(target)
        log.info("INT8 export of %s verified: held-out mAP50-95 %.4f vs %.4f for the .pt (%d calibration images)",
                 checkpoint, check.map50_95, reference, check.calibration_images)
    except Exception as exc:
        check.reason = f"INT8 export failed: {type(exc).__name__}: {exc}"[:500]
        log.warning("INT8 export of %s failed: %s", checkpoint, check.reason)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if threads:
            ultralytics_env.restore_torch_threads(threads)
    return check


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a YOLO checkpoint to ONNX/OpenVINO and verify the boxes.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--formats", default=",".join(EXPORT_FORMATS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = export_and_check(args.checkpoint, args.out_dir, args.images, args.imgsz, tuple(args.formats.split(",")))
    print(json.dumps(report.to_meta(), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
