"""The registry: control tag (writing) and result type (reading) -> its control model."""

from __future__ import annotations

from backend.control_models.base import ControlModel
from backend.control_models.brush_labels import BrushLabelsModel
from backend.control_models.polygon_labels import PolygonLabelsModel
from backend.control_models.rectangle_labels import RectangleLabelsModel

CONTROL_MODELS: dict[str, type[ControlModel]] = {
    cls.tag: cls for cls in (RectangleLabelsModel, BrushLabelsModel, PolygonLabelsModel)
}
"""Control tag (``RectangleLabels``) -> its model: the predictor writes each control's regions with it."""

BY_RESULT_TYPE: dict[str, type[ControlModel]] = {cls.result_type: cls for cls in CONTROL_MODELS.values()}
"""Result ``type`` (``rectanglelabels``) -> its model: readers of annotations and predictions use it."""
