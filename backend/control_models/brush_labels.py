"""BrushLabels: a detection's mask as Label Studio RLE; detections without a mask are skipped."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.control_models.base import ControlModel
from backend.core import geometry
from backend.core.detections import Detections


class BrushLabelsModel(ControlModel):
    tag = "BrushLabels"
    result_type = "brushlabels"

    def value(self, detections: Detections, index: int) -> dict | None:
        if detections.masks is None or not detections.masks[index].any():
            return None
        mask = detections.masks[index].astype(np.uint8) * 255
        return {"format": "rle", "rle": mask2rle(mask)}

    @classmethod
    def read_mask(cls, value: dict, width: int, height: int) -> np.ndarray | None:
        """The decoded RLE; None when there is none. An RLE whose header does not declare this image's
        size, or that does not decode, raises :class:`~backend.core.geometry.BrushMaskError` (a
        ``ValueError``: the reader skips and counts the region) before anything is allocated."""
        rle = value.get("rle")
        return geometry.ls_brush_to_mask(rle, width, height) if rle else None

    @classmethod
    def read_box(cls, value: dict, width: int, height: int) -> np.ndarray | None:
        """The mask's bounding box (None when empty; an undecodable RLE raises like :meth:`read_mask`)."""
        mask = cls.read_mask(value, width, height)
        return None if mask is None else geometry.mask_to_xyxy(mask)

    @classmethod
    def conversion(cls, value: dict) -> str | None:
        return "brush"
