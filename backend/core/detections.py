"""The one internal detection type every detector returns and everything downstream reads.

Gemini, YOLO (and later other detectors) all produce a :class:`Detections`; routing, the Label
Studio conversion, datasets and evaluation only ever read this. Boxes are absolute pixel
``xyxy`` in the *original* image (after EXIF transpose); conversions to and from other box formats
live in :mod:`backend.core.geometry` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Detections:
    """N detections on one image of size ``image_size = (width, height)``.

    ``labels`` are Label Studio label values (already mapped from the detector's own vocabulary).
    ``masks`` is an optional ``(N, H, W)`` boolean array in original image pixels.
    ``source`` names the detector ("gemini", "yolo", ...), ``model`` its exact model/version.
    """

    xyxy: np.ndarray
    labels: list[str]
    scores: np.ndarray
    image_size: tuple[int, int]
    source: str
    model: str = ""
    masks: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        object.__setattr__(self, "xyxy", np.asarray(self.xyxy, dtype=float).reshape(n, 4))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=float).reshape(n))
        if self.masks is not None:
            masks = np.asarray(self.masks, dtype=bool)
            if masks.shape[0] != n:
                raise ValueError(f"{masks.shape[0]} masks for {n} detections")
            object.__setattr__(self, "masks", masks)

    def __len__(self) -> int:
        return len(self.labels)

    def filter(self, keep: np.ndarray | list[bool] | list[int]) -> Detections:
        """A subset, by boolean mask or index list, keeping order."""
        keep = np.asarray(keep)
        if keep.size == 0:  # ``[]`` is a float array to NumPy, which refuses it as an index
            keep = keep.astype(int)
        idx = np.arange(len(self))[keep] if len(self) else np.zeros(0, dtype=int)
        return Detections(
            self.xyxy[idx],
            [self.labels[i] for i in idx],
            self.scores[idx],
            self.image_size,
            self.source,
            self.model,
            None if self.masks is None else self.masks[idx],
            dict(self.meta),
        )
