"""One small class per Label Studio control tag turns :class:`Detections` into its regions.

Like the control models of Label Studio's official YOLO backend: each class knows one tag's
result format and nothing else; geometry comes from :mod:`backend.core.geometry`.
"""

from __future__ import annotations

import uuid
from typing import ClassVar

from backend.core.detections import Detections
from backend.core.label_config import ControlSpec


class ControlModel:
    """Regions of one control for one image."""

    tag: ClassVar[str] = ""
    result_type: ClassVar[str] = ""

    def __init__(self, control: ControlSpec, threshold: float = 0.0):
        self.control = control
        self.threshold = threshold

    def regions(self, detections: Detections) -> list[dict]:
        width, height = detections.image_size
        out = []
        for i, label in enumerate(detections.labels):
            score = float(detections.scores[i])
            if label not in self.control.label_values or score < self.threshold:
                continue
            value = self.value(detections, i)
            if value is None:
                continue
            out.append({
                "id": uuid.uuid4().hex[:10],
                "from_name": self.control.name,
                "to_name": self.control.to_name,
                "type": self.result_type,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {**value, self.result_type: [label]},
                "score": score,
                # Which detector drafted the region: the training job's draft-quality metrics read it,
                # and Label Studio shows meta.text in the region's details.
                "meta": {"source": detections.source, "text": [f"source: {detections.source} {detections.model}".strip()]},
            })
        return out

    def value(self, detections: Detections, index: int) -> dict | None:  # pragma: no cover - abstract
        raise NotImplementedError
