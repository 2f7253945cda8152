"""One small class per Label Studio control tag: writes its regions and reads them back.

Like the control models of Label Studio's official YOLO backend: each class knows one tag's
result format and nothing else; geometry comes from :mod:`backend.core.geometry`. Writing
(:meth:`ControlModel.regions`) turns :class:`Detections` into result dicts for one control;
reading (:meth:`ControlModel.read_box`, :meth:`ControlModel.read_mask`) turns one region's
``value`` back into pixels, for the dataset builder, the gate's drafts and evaluation
(:mod:`backend.control_models.reader` walks whole result lists).
"""

from __future__ import annotations

import uuid
from typing import ClassVar

import numpy as np

from backend.core.detections import Detections
from backend.core.label_config import ControlSpec


class ControlModel:
    """Regions of one control for one image."""

    tag: ClassVar[str] = ""
    result_type: ClassVar[str] = ""

    def __init__(self, control: ControlSpec, threshold: float = 0.0):
        self.control = control
        self.threshold = threshold

    # --- writing: Detections -> Label Studio --------------------------------------------------

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

    # --- reading: Label Studio -> pixels ------------------------------------------------------

    @classmethod
    def labels_of(cls, value: dict) -> list[str]:
        """The label values a region carries (Label Studio keeps them under the result type)."""
        return [str(label) for label in value.get(cls.result_type) or []]

    @classmethod
    def read_box(cls, value: dict, width: int, height: int) -> np.ndarray | None:  # pragma: no cover - abstract
        """The region's axis-aligned pixel box in a ``width`` x ``height`` image; None when it has no shape.

        A malformed value raises ``KeyError``, ``TypeError`` or ``ValueError`` (the reader counts it).
        """
        raise NotImplementedError

    @classmethod
    def read_mask(cls, value: dict, width: int, height: int) -> np.ndarray | None:
        """The region's boolean ``(height, width)`` mask; None for shapes that are boxes only."""
        return None

    @classmethod
    def conversion(cls, value: dict) -> str | None:
        """How reading changed the shape ("rotated", "polygon", "brush"), counted by the dataset builder."""
        return None
