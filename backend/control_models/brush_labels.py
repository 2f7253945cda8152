"""BrushLabels: a detection's mask as Label Studio RLE; detections without a mask are skipped."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.control_models.base import ControlModel
from backend.core.detections import Detections


class BrushLabelsModel(ControlModel):
    tag = "BrushLabels"
    result_type = "brushlabels"

    def value(self, detections: Detections, index: int) -> dict | None:
        if detections.masks is None or not detections.masks[index].any():
            return None
        mask = detections.masks[index].astype(np.uint8) * 255
        return {"format": "rle", "rle": mask2rle(mask)}
