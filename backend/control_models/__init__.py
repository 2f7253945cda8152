"""Label Studio's region format, one control model per tag: each writes its regions and reads them back.

- Writing: ``CONTROL_MODELS[control.tag](control, threshold).regions(detections)`` (the predictor,
  ``lsb export``).
- Reading: :func:`parse_regions` turns an annotation's or a prediction's result list into pixel
  boxes, labels and, on request, masks (the dataset builder, the gate's drafts, evaluation truth).

Adding a tag (e.g. ``KeyPointLabels``):

1. a module here with a :class:`ControlModel` subclass: ``tag``, ``result_type``, ``value()``
   (write one detection) and ``read_box()`` / ``read_mask()`` / ``conversion()`` (read one region);
   a missing conversion goes into :mod:`backend.core.geometry`;
2. the class in the tuple of :mod:`backend.control_models.tags`;
3. the tag in ``SUPPORTED_CONTROLS`` of :mod:`backend.core.label_config` (and ``MASK_CONTROLS`` if it
   needs masks), which also gives ``lsb --tag`` its short name;
4. tests in ``tests/backend/control_models/test_<module>.py``, including a write-then-read round trip.

Nothing outside this package and the label config knows a region's format.
"""

from backend.control_models.base import ControlModel
from backend.control_models.reader import ParsedRegions, labels_in_regions, parse_regions, region_score, region_width_height
from backend.control_models.tags import BY_RESULT_TYPE, CONTROL_MODELS

__all__ = [
    "BY_RESULT_TYPE", "CONTROL_MODELS", "ControlModel", "ParsedRegions",
    "labels_in_regions", "parse_regions", "region_score", "region_width_height",
]
