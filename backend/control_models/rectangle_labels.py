"""RectangleLabels: one axis-aligned box per detection, in percent of the image."""

from __future__ import annotations

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
