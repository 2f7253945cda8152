"""RectangleLabels: one axis-aligned box per detection, in percent of the image."""

from __future__ import annotations

import numpy as np

from backend.control_models.base import ControlModel
from backend.core import geometry
from backend.core.detections import Detections


class RectangleLabelsModel(ControlModel):
    tag = "RectangleLabels"
    result_type = "rectanglelabels"

    def value(self, detections: Detections, index: int) -> dict | None:
        width, height = detections.image_size
        value = geometry.xyxy_to_ls(detections.xyxy[index], width, height)
        return value if value["width"] > 0 and value["height"] > 0 else None

    @classmethod
    def read_box(cls, value: dict, width: int, height: int) -> np.ndarray | None:
        """A rotated rectangle becomes its axis-aligned bounds, clipped to the image."""
        return geometry.ls_to_xyxy(value, width, height)

    @classmethod
    def conversion(cls, value: dict) -> str | None:
        return "rotated" if float(value.get("rotation") or 0.0) % 360.0 else None
