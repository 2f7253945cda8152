"""PolygonLabels: the outline of a detection's mask, in percent points."""

from __future__ import annotations

import numpy as np

from backend.control_models.base import ControlModel
from backend.core import geometry
from backend.core.detections import Detections


class PolygonLabelsModel(ControlModel):
    tag = "PolygonLabels"
    result_type = "polygonlabels"

    def value(self, detections: Detections, index: int) -> dict | None:
        if detections.masks is None:
            return None
        points = geometry.mask_to_polygon(detections.masks[index])
        if points is None:
            return None
        width, height = detections.image_size
        return {"points": geometry.pixels_to_ls_points(points, width, height), "closed": True}

    @staticmethod
    def _pixels(value: dict, width: int, height: int) -> np.ndarray | None:
        points = value.get("points") or []
        return geometry.ls_points_to_pixels(points, width, height) if len(points) >= 3 else None

    @classmethod
    def read_box(cls, value: dict, width: int, height: int) -> np.ndarray | None:
        """The polygon's bounding box, clipped to the image (None under three points)."""
        points = cls._pixels(value, width, height)
        if points is None:
            return None
        return np.clip(geometry.points_to_xyxy(points), 0, [width, height, width, height])

    @classmethod
    def read_mask(cls, value: dict, width: int, height: int) -> np.ndarray | None:
        points = cls._pixels(value, width, height)
        return None if points is None else geometry.polygon_to_mask(points, width, height)

    @classmethod
    def conversion(cls, value: dict) -> str | None:
        return "polygon"
