"""YOLO detector: one loaded Ultralytics checkpoint, batched inference, class names mapped to labels."""

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


class YoloDetector:
    """A loaded checkpoint. Thread-safe: Ultralytics predictors are not, so calls take a lock."""

    source = "yolo"

    def __init__(self, path: Path | str, version: str, device: str = "cpu", imgsz: int = 0, threads: int = 0, task: str | None = None):
        ultralytics_env.prepare()
        from ultralytics import YOLO

        path = Path(path)
        if not path.exists():  # YOLO() would try to download any missing .pt name
            raise FileNotFoundError(f"YOLO checkpoint not found: {path}")
        self.path = path
        self.version = version
        self.model_name = f"yolo:{version}"
        self._model = YOLO(str(path), task=task or "detect")
        self._device = device
        self._imgsz = imgsz or self._trained_imgsz()
        self._lock = threading.Lock()
        self.names: dict[int, str] = dict(self._model.names)
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)

    def _trained_imgsz(self) -> int:
        args = getattr(self._model, "overrides", {}) or {}
        size = args.get("imgsz")
        if isinstance(size, (list, tuple)):
            size = max(size)
        return int(size) if size else 640

    def warm_up(self) -> None:
        """Pay Ultralytics' first-call cost before the model serves (called by the hot-swap loader)."""
        self._predict([Image.new("RGB", (64, 64))], conf=0.99)

    def _predict(self, images: list[Image.Image], conf: float):
        with self._lock:
            return self._model.predict(images, imgsz=self._imgsz, conf=conf, device=self._device, verbose=False)

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
