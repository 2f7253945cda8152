"""Control tag name -> the class that writes its regions."""

from backend.control_models.base import ControlModel
from backend.control_models.brush_labels import BrushLabelsModel
from backend.control_models.polygon_labels import PolygonLabelsModel
from backend.control_models.rectangle_labels import RectangleLabelsModel

CONTROL_MODELS: dict[str, type[ControlModel]] = {
    cls.tag: cls for cls in (RectangleLabelsModel, BrushLabelsModel, PolygonLabelsModel)
}

__all__ = ["CONTROL_MODELS", "ControlModel"]
