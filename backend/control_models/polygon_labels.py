"""PolygonLabels: the outline of a detection's mask, in percent points."""

from __future__ import annotations

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
