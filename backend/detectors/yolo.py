"""YOLO detector: one loaded Ultralytics model, batched inference, class names mapped to labels.

The model is a ``.pt`` checkpoint or one of its verified exports (``worker.training.exporter``): an ONNX file
(ONNX Runtime) or an ``*_openvino_model`` folder (OpenVINO), both several times faster on CPU.
:meth:`YoloDetector.load` picks the fastest export that loads and falls back to the ``.pt``.

This is the only YOLO inference path: serving, the promotion gate (``worker.training.gate``), the
export check (``worker.training.exporter``), ``lsb detect/eval/train`` and the benchmarks all predict
through :class:`YoloDetector`, so what the gate measures is what serves.
"""

from __future__ import annotations

import ast
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from backend.core import geometry, ultralytics_env
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig

log = logging.getLogger(__name__)

EXPORT_FORMATS = ultralytics_env.EXPORT_FORMATS  # served instead of the .pt when a version has them, fastest first
# A version's INT8 OpenVINO export (``model_int8_openvino_model/``): the registry lists it only when it passed
# its held-out mAP check (``worker.training.exporter``); served before the f32 formats (YOLO_SERVE_INT8).
INT8_FORMAT = "openvino_int8"


def serving_formats(int8: bool = True) -> tuple[str, ...]:
    """The export formats a server tries, fastest first."""
    return ((INT8_FORMAT,) if int8 else ()) + tuple(EXPORT_FORMATS)
# Most boxes one image may get (Ultralytics' default, explicit so the evaluation can use the same figure:
# ``backend.evaluation.metrics`` passes it to COCOeval, whose own default of 100 would drop boxes on crowded images).
MAX_DET = 300

# Every YOLO call of the process runs on this one thread. Torch's OpenMP keeps a thread team per
# calling thread: requests arriving on gunicorn's 8 threads built 8 teams, more OpenMP threads than
# cores, and libgomp then stops spin-waiting between the model's parallel regions: a 1-image predict
# took 2x as long from any thread once a second one had predicted (measured: 12.7 ms vs 29.7 ms).
# Ultralytics predictors are not thread-safe either, so calls were serialised anyway.
_INFERENCE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yolo-inference")


def on_inference_thread(fn, *args):
    """``fn(*args)`` on the process's one YOLO inference thread (see above), waiting for its result."""
    return _INFERENCE.submit(fn, *args).result()


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
        from ultralytics.nn.backends.base import BaseBackend  # heavy: ultralytics, only to read an export's metadata

        meta = dict(BaseBackend.read_metadata(path) or {})
    except Exception:  # an older Ultralytics or an unreadable file: the model load will tell
        return {}

    for key in ("names", "args", "imgsz"):
        if isinstance(meta.get(key), str):
            try:
                meta[key] = ast.literal_eval(meta[key])
            except (ValueError, SyntaxError):
                meta.pop(key)
    return meta


def openvino_precision(model):
    """The ``openvino.Type`` an Ultralytics-loaded OpenVINO model was compiled in (after its first predict)."""
    backend = getattr(getattr(getattr(model, "predictor", None), "model", None), "backend", None)
    compiled = getattr(backend, "ov_compiled_model", None)
    if compiled is None:
        raise RuntimeError("no Ultralytics OpenVINO backend")
    return compiled.get_property("INFERENCE_PRECISION_HINT")


def check_openvino_f32(model, path: Path | str) -> None:
    """Refuse to serve an OpenVINO model compiled in anything but f32 (bf16 moves boxes)."""
    import openvino as ov  # heavy, optional: openvino, only for an OpenVINO export

    precision = openvino_precision(model)
    if precision != ov.Type.f32:
        raise RuntimeError(f"OpenVINO compiled {path} in {precision}, not f32")


# Set once this process has warmed up an OpenVINO model at normal priority: OpenVINO's TBB worker
# threads, which run every later inference beside the calling thread, then exist at nice 0.
_OPENVINO_WORKERS_BORN = threading.Event()


def _lowest_priority_for_this_thread() -> None:
    """Nice 19 for the calling thread only (Linux): a model warming up yields the cores to the one serving.

    Only for a short-lived thread whose lasting child threads never run inference: threads inherit
    the nice value. A .pt's OpenMP team dies with the thread. An OpenVINO compile starts a few
    threads of its own that measured idle during inference (the calling thread and TBB's workers,
    born with the process's first OpenVINO model, do the work), so only that first model must warm
    up at normal priority. ONNX Runtime's session threads run every inference: never lowered.
    Never for work that holds the GIL for long (a checkpoint's unpickling in ``YOLO(path)``): a
    nice-19 thread holding it gets no core while the serving threads wait for it (measured when
    construction ran here: p99 5.6 s and 7 s swaps during a .pt hot-swap).
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: warm up at normal priority
        pass


def _warms_up_at_low_priority(fmt: str) -> bool:
    """Whether a model of this format may warm up at nice 19 (see :func:`_lowest_priority_for_this_thread`)."""
    return fmt == "pt" or (fmt == "openvino" and _OPENVINO_WORKERS_BORN.is_set())


class YoloDetector:
    """A loaded checkpoint or export. Thread-safe: every call runs on the process's one inference thread."""

    source = "yolo"

    def __init__(self, path: Path | str, version: str, device: str = "cpu", imgsz: int = 0, threads: int = 0,
                 task: str | None = None, max_det: int = MAX_DET):
        ultralytics_env.prepare()
        from ultralytics import YOLO  # heavy: ultralytics (torch), imported only when a model is loaded

        path = Path(path)
        if not path.exists():  # YOLO() would try to download any missing .pt name
            raise FileNotFoundError(f"YOLO checkpoint not found: {path}")
        self.format = model_format(path)
        self.path = path
        self.version = version
        self.model_name = f"yolo:{version}"
        self._export_meta = export_metadata(path) if self.format != "pt" else {}
        if self.format == "openvino":
            ultralytics_env.openvino_in_f32()  # before Ultralytics compiles it, at the first predict
        self._model = YOLO(str(path), task=task or self._export_meta.get("task") or "detect")
        self._device = device
        self._imgsz = imgsz or self._trained_imgsz()
        self.max_det = int(max_det)
        names = self._export_meta.get("names")
        if self.format != "pt" and isinstance(names, dict) and names:
            self.names: dict[int, str] = {int(k): str(v) for k, v in names.items()}
        else:  # for an export without metadata this loads it once more (Ultralytics' names property)
            self.names = dict(self._model.names)
        # YOLO_THREADS are torch's inference threads. An export runs in ONNX Runtime's or OpenVINO's own
        # thread pool and torch only pre/post-processes small tensors: more torch threads there only spin
        # on the cores the runtime needs (measured: 2 torch threads made OpenVINO calls ~1.8x slower).
        self._threads = threads or (ultralytics_env.all_cores() if self.format == "pt" else 1)
        self._set_threads()

    @property
    def imgsz(self) -> int:
        return self._imgsz

    def _set_threads(self) -> None:
        """Torch threads as configured, again after the first predict set Ultralytics' predictor up."""
        ultralytics_env.restore_torch_threads(self._threads)

    @classmethod
    def load(cls, checkpoint: Path | str, version: str, exports: dict[str, Path] | None = None, device: str = "cpu",
             imgsz: int = 0, threads: int = 0, formats: tuple[str, ...] = EXPORT_FORMATS) -> YoloDetector:
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
        """Pay the first-call costs before the model serves (called by the hot-swap loader).

        The expensive first call (Ultralytics' predictor set-up, fusing, an export's compile) runs
        off the inference thread, so the serving model keeps answering meanwhile, and in a thread
        of its own that then ends, taking along any OpenMP team it made (see ``_INFERENCE``), at
        nice 19 where that is safe. One more call on the inference thread sets its torch threads.
        """
        blank = [Image.new("RGB", (64, 64))]
        failure: list[BaseException] = []
        low_priority = _warms_up_at_low_priority(self.format)

        def first_call() -> None:
            if low_priority:
                _lowest_priority_for_this_thread()
            try:
                self._model.predict(blank, imgsz=self._imgsz, conf=0.99, device=self._device, max_det=self.max_det, verbose=False)
            except BaseException as exc:  # re-raised in the caller
                failure.append(exc)

        thread = threading.Thread(target=first_call, name="yolo-warm-up")  # not a daemon: exit waits for it
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        self._predict(blank, conf=0.99)
        if self.format == "openvino":
            check_openvino_f32(self._model, self.path)
            _OPENVINO_WORKERS_BORN.set()

    def _predict(self, images: list[Image.Image], conf: float):
        return on_inference_thread(self._predict_here, images, conf)

    def _predict_here(self, images: list[Image.Image], conf: float):
        self._set_threads()
        try:
            return self._model.predict(images, imgsz=self._imgsz, conf=conf, device=self._device, max_det=self.max_det,
                                       verbose=False)
        finally:
            self._set_threads()  # a first predict sets Ultralytics' predictor up, which changes them

    def detect_batch(self, images: list[Image.Image], config: ProjectConfig, threshold: float) -> list[Detections]:
        """Detections for each image, labels mapped through the config (unmapped classes dropped)."""
        label_of = {i: config.match_label(name) for i, name in self.names.items()}
        return self._detections(images, threshold, label_of, config.wants_masks)

    def detect_model_classes(self, images: list[Image.Image], threshold: float) -> list[Detections]:
        """Detections labelled with the model's own class names (no label config: the export check)."""
        return self._detections(images, threshold, dict(self.names), False)

    def _detections(self, images: list[Image.Image], threshold: float, label_of: dict[int, str | None],
                    wants_masks: bool) -> list[Detections]:
        if not images:
            return []
        results = self._predict(images, conf=threshold)
        out = []
        for image, result in zip(images, results):
            boxes = result.boxes
            classes = boxes.cls.cpu().numpy().astype(int) if boxes is not None else np.zeros(0, int)
            keep = np.array([label_of.get(c) is not None for c in classes], dtype=bool)
            masks = None
            if getattr(result, "masks", None) is not None and wants_masks:
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
