"""Tiny YOLO checkpoints for tests that need a loadable model but no trained one."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def make_checkpoint(path: Path, names: Sequence[str], cfg: str = "yolov8n.yaml", seed: int = 0) -> Path:
    """A randomly initialised detector with ``names`` as classes, saved as an Ultralytics .pt."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = YOLO(cfg)
    model.model = DetectionModel(cfg, nc=len(names), verbose=False)
    model.model.names = {i: n for i, n in enumerate(names)}
    model.model.args = {"imgsz": 64}
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path
