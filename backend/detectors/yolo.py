"""YOLO detector: one loaded Ultralytics model, batched inference, class names mapped to labels.

The model is a ``.pt`` checkpoint or one of its verified exports (``worker.export``): an ONNX file
(ONNX Runtime) or an ``*_openvino_model`` folder (OpenVINO), both several times faster on CPU.
:meth:`YoloDetector.load` picks the fastest export that loads and falls back to the ``.pt``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from backend import geometry, ultralytics_env
from backend.detections import Detections
from backend.label_config import ProjectConfig

log = logging.getLogger(__name__)

# Export formats served instead of the .pt when a version has them, fastest first (PROTOCOL.md 3).
EXPORT_FORMATS = ("openvino", "onnx")


def model_format(path: Path | str) -> str:
    """``pt``, ``onnx`` or ``openvino`` from the path alone (Ultralytics' own naming)."""
    path = Path(path)
    if path.name.endswith("_openvino_model"):
        return "openvino"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".pt":
        return "pt"
    raise ValueError(f"not a YOLO checkpoint or a supported export: {path}")


def _as_size(value) -> int | None:
    if isinstance(value, str):
        import ast

        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    if isinstance(value, (list, tuple)):
        value = max(value) if value else None
    try:
        return int(value) if value else None
    except (TypeError, ValueError):
        return None


def export_metadata(path: Path | str) -> dict:
    """Ultralytics' metadata of an export (names, imgsz, dynamic...), read without loading the model."""
    try:
        from ultralytics.nn.backends.base import BaseBackend

        meta = dict(BaseBackend.read_metadata(path) or {})
    except Exception:  # an older Ultralytics or an unreadable file: the model load will tell
        return {}
    import ast

    for key in ("names", "args", "imgsz"):
        if isinstance(meta.get(key), str):
            try:
                meta[key] = ast.literal_eval(meta[key])
            except (ValueError, SyntaxError):
                meta.pop(key)
    return meta


def openvino_full_precision(model, path: Path | str) -> bool:
    """Recompile an Ultralytics-loaded OpenVINO model in f32 (after its predictor is set up).

    OpenVINO's CPU plugin runs in bf16 by default on CPUs that have it (AVX512-BF16, AMX): boxes then
    drift from the .pt's by a pixel or two (IoU ~0.95 measured on AMD EPYC), and Ultralytics offers no
    way to pass ``INFERENCE_PRECISION_HINT``. Returns True once the compiled model runs in f32.
    """
    import functools

    import openvino as ov

    backend = getattr(getattr(getattr(model, "predictor", None), "model", None), "backend", None)
    compiled = getattr(backend, "ov_compiled_model", None)
    compile_model = getattr(backend, "compile_model", None)
    if compiled is None or not isinstance(compile_model, functools.partial):
        raise RuntimeError("no Ultralytics OpenVINO backend to recompile")
    if compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32:
        return True
    config = {**compile_model.keywords.get("config", {}), "INFERENCE_PRECISION_HINT": "f32"}
    backend.compile_model = functools.partial(compile_model.func, device_name=compile_model.keywords["device_name"], config=config)
    path = Path(path)
    xml = path if path.is_file() else next(path.glob("*.xml"))
    backend.ov_compiled_model = backend.compile_model(ov.Core().read_model(model=str(xml), weights=str(xml.with_suffix(".bin"))))
    return backend.ov_compiled_model.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


class YoloDetector:
    """A loaded checkpoint or export. Thread-safe: Ultralytics predictors are not, so calls take a lock."""

    source = "yolo"

    def __init__(self, path: Path | str, version: str, device: str = "cpu", imgsz: int = 0, threads: int = 0, task: str | None = None):
        ultralytics_env.prepare()
        from ultralytics import YOLO

        path = Path(path)
        if not path.exists():  # YOLO() would try to download any missing .pt name
            raise FileNotFoundError(f"YOLO checkpoint not found: {path}")
        self.format = model_format(path)
        self.path = path
        self.version = version
        self.model_name = f"yolo:{version}"
        self._export_meta = export_metadata(path) if self.format != "pt" else {}
        self._model = YOLO(str(path), task=task or self._export_meta.get("task") or "detect")
        self._device = device
        self._imgsz = imgsz or self._trained_imgsz()
        self._lock = threading.Lock()
        self._full_precision = False
        names = self._export_meta.get("names")
        if self.format != "pt" and isinstance(names, dict) and names:
            self.names: dict[int, str] = {int(k): str(v) for k, v in names.items()}
        else:  # for an export without metadata this loads it once more (Ultralytics' names property)
            self.names = dict(self._model.names)
        # YOLO_THREADS are torch's inference threads. An export runs in ONNX Runtime's or OpenVINO's own
        # thread pool and torch only pre/post-processes small tensors: more torch threads there only spin
        # on the cores the runtime needs (measured: 2 torch threads made OpenVINO calls ~1.8x slower).
        self._threads = threads or ((os.cpu_count() or 1) if self.format == "pt" else 1)
        self._set_threads()

    def _set_threads(self) -> None:
        """Torch threads as configured. Ultralytics' ``select_device`` lowers them to ``cpu_count - 1``
        (1 on 2 cores) when a predictor is set up, i.e. at the first predict: set them again after it."""
        import torch

        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    @classmethod
    def load(cls, checkpoint: Path | str, version: str, exports: dict[str, Path] | None = None, device: str = "cpu",
             imgsz: int = 0, threads: int = 0, formats: tuple[str, ...] = EXPORT_FORMATS) -> "YoloDetector":
        """The fastest model of a version that loads and answers, warmed up.

        Tries the exports in ``formats`` order (CPU only: on a GPU the .pt is the fast path), then
        the ``.pt`` checkpoint. A missing or broken export is logged and skipped, never fatal.
        """
        if str(device).lower() == "cpu":
            for fmt in formats:
                path = (exports or {}).get(fmt)
                if path is None:
                    continue
                try:
                    detector = cls(path, version, device, imgsz, threads)
                    detector.warm_up()
                    log.info("YOLO %s serves from its %s export", version, fmt)
                    return detector
                except Exception as exc:
                    log.warning("YOLO %s: the %s export %s did not load (%s: %s); trying the next format",
                                version, fmt, path, type(exc).__name__, exc)
        detector = cls(checkpoint, version, device, imgsz, threads)
        detector.warm_up()
        return detector

    def _trained_imgsz(self) -> int:
        if self.format != "pt":  # an export runs at the size it was exported at
            size = _as_size(self._export_meta.get("imgsz"))
            if size:
                return size
        args = getattr(self._model, "overrides", {}) or {}
        size = _as_size(args.get("imgsz"))
        return size or 640

    def warm_up(self) -> None:
        """Pay Ultralytics' first-call cost before the model serves (called by the hot-swap loader)."""
        self._predict([Image.new("RGB", (64, 64))], conf=0.99)
        self._set_threads()  # the first predict set up Ultralytics' predictor, which changed them

    def _predict(self, images: list[Image.Image], conf: float):
        with self._lock:
            self._set_threads()
            results = self._model.predict(images, imgsz=self._imgsz, conf=conf, device=self._device, verbose=False)
            if self.format == "openvino" and not self._full_precision:  # the first call set the predictor up
                if not openvino_full_precision(self._model, self.path):
                    raise RuntimeError("OpenVINO did not accept f32 inference")
                self._full_precision = True
                results = self._model.predict(images, imgsz=self._imgsz, conf=conf, device=self._device, verbose=False)
            return results

    def detect_batch(self, images: list[Image.Image], config: ProjectConfig, threshold: float) -> list[Detections]:
        """Detections for each image, labels mapped through the config (unmapped classes dropped)."""
        if not images:
            return []
        results = self._predict(images, conf=threshold)
        label_of = {i: config.match_label(name) for i, name in self.names.items()}
        out = []
        for image, result in zip(images, results):
            boxes = result.boxes
            classes = boxes.cls.cpu().numpy().astype(int) if boxes is not None else np.zeros(0, int)
            keep = np.array([label_of.get(c) is not None for c in classes], dtype=bool)
            masks = None
            if getattr(result, "masks", None) is not None and config.wants_masks:
                masks = self._full_size_masks(result, image.size)[keep]
            out.append(Detections(
                xyxy=boxes.xyxy.cpu().numpy()[keep] if boxes is not None else np.zeros((0, 4)),
                labels=[label_of[c] for c in classes[keep]],
                scores=boxes.conf.cpu().numpy()[keep] if boxes is not None else np.zeros(0),
                image_size=image.size,
                source=self.source,
                model=self.model_name,
                masks=masks,
            ))
        return out

    @staticmethod
    def _full_size_masks(result, size: tuple[int, int]) -> np.ndarray:
        """Segmentation outlines (already in original pixels) filled into full-image masks."""
        width, height = size
        polygons = result.masks.xy
        if not len(polygons):
            return np.zeros((0, height, width), bool)
        return np.stack([geometry.polygon_to_mask(points, width, height) for points in polygons])
