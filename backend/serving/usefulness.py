"""How much the model would learn from a human correcting a task: one number in [0, 1], higher = more useful.

Label Studio's Community Edition sorts the Data Manager by a prediction's ``score`` but has no active
learning (docs/label-studio.md#sorting-by-prediction-score), so the score we store *is* the ranking.
It is computed from YOLO's own view of the image: :class:`~backend.core.detections.Detections` from
:meth:`backend.detectors.yolo.YoloDetector.detect_batch` at a low floor (``FLOOR``), so boxes under the
serving threshold count too. Ultralytics' NMS keeps each box's best class only (docs/ultralytics.md),
so the class margin is read from overlapping boxes of different classes.

Variants (``VARIANTS``), each in [0, 1]:

- ``least_confidence``: 1 - mean confidence of the boxes at or above the threshold the model serves at,
  weighted toward the uncertain ones; 1.0 when the model sees nothing there (it has everything to learn).
- ``band``: how many boxes sit in the uncertain band ``[FLOOR, 2 x threshold)``: ``1 - exp(-n / BAND_SCALE)``.
- ``margin``: 1 - mean margin between each box's class and the best other class drawn on the same spot
  (IoU >= ``SAME_SPOT_IOU``); a box alone on its spot has margin = its confidence.
- ``combined``: the mean of the three.

Where another detector's draft exists (Gemini's), ``disagreement`` = 1 - the mean best same-label IoU
of every box of either draft with the other (0 when both are empty, 1 when only one is), and the score
is the mean of the variant and the disagreement. Which variant serves is chosen by measurement
(``python -m bench --only active``, BENCHMARKS.md section "Active learning"): ``DEFAULT_VARIANT``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from backend.core import geometry
from backend.core.detections import Detections
from backend.evaluation.metrics import best_ious

#: Confidence floor YOLO is asked at when the score is wanted (boxes below it are noise even to a weak model).
FLOOR = 0.05
#: A box count in the uncertain band that makes ``band`` reach 1 - 1/e.
BAND_SCALE = 3.0
#: Two boxes this overlapped mark the same object (the class margin compares their classes).
SAME_SPOT_IOU = 0.7
VARIANTS = ("least_confidence", "band", "margin", "combined")
DEFAULT_VARIANT = "combined"  # measured: beat least_confidence, band and random (BENCHMARKS.md section 12)


def _clip(value: float) -> float:
    return float(min(1.0, max(0.0, value)))


def least_confidence(yolo: Detections, threshold: float) -> float:
    """1 - mean confidence of the served boxes; every box weighs 1 - its confidence, so doubtful ones dominate."""
    scores = yolo.scores[yolo.scores >= threshold]
    if not len(scores):
        return 1.0
    weights = 1.0 - scores + 1e-6
    return _clip(1.0 - float(np.average(scores, weights=weights)))


def band(yolo: Detections, threshold: float) -> float:
    """Saturating count of boxes in ``[FLOOR, 2 x threshold)``: many near-misses = much to learn."""
    n = int(np.count_nonzero((yolo.scores >= FLOOR) & (yolo.scores < min(1.0, 2.0 * threshold))))
    return _clip(1.0 - math.exp(-n / BAND_SCALE))


def margin(yolo: Detections, threshold: float) -> float:
    """1 - mean class margin of the boxes at or above ``FLOOR`` (0 margin: two classes tie on one spot)."""
    keep = yolo.scores >= FLOOR
    if not np.any(keep):
        return 1.0
    boxes, scores = yolo.xyxy[keep], yolo.scores[keep]
    labels = np.array(yolo.labels, dtype=object)[keep]
    iou = geometry.box_iou(boxes, boxes)
    rival = np.where((iou >= SAME_SPOT_IOU) & (labels[:, None] != labels[None, :]), scores[None, :], 0.0)
    margins = scores - rival.max(axis=1)
    return _clip(1.0 - float(np.clip(margins, 0.0, 1.0).mean()))


def combined(yolo: Detections, threshold: float) -> float:
    return _clip((least_confidence(yolo, threshold) + band(yolo, threshold) + margin(yolo, threshold)) / 3.0)


_FUNCTIONS = {"least_confidence": least_confidence, "band": band, "margin": margin, "combined": combined}


def disagreement(yolo: Detections, other: Detections, threshold: float) -> float:
    """1 - mean best same-label IoU between YOLO's served boxes and another draft's, both ways."""
    mine = yolo.filter(yolo.scores >= threshold)
    if not len(mine) and not len(other):
        return 0.0
    if not len(mine) or not len(other):
        return 1.0
    forward, _ = best_ious(mine, other)  # each of the other draft's boxes against YOLO's
    backward, _ = best_ious(other, mine)
    return _clip(1.0 - float(np.concatenate([forward, backward]).mean()))


def usefulness(yolo: Detections, threshold: float, other: Detections | None = None,
               variant: str = DEFAULT_VARIANT) -> float:
    """The task's score: ``variant`` of YOLO's view (asked at ``FLOOR``), averaged with the disagreement
    with ``other`` (another detector's draft of the same image) when there is one."""
    if variant not in _FUNCTIONS:
        raise ValueError(f"unknown usefulness variant {variant!r}; one of {', '.join(VARIANTS)}")
    score = _FUNCTIONS[variant](yolo, threshold)
    if other is not None and other.source != yolo.source:
        score = (score + disagreement(yolo, other, threshold)) / 2.0
    return round(_clip(score), 6)


def rank(scores: Sequence[float]) -> list[int]:
    """Indices from most to least useful (ties keep their order: import order breaks ties, as in Label Studio)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])
