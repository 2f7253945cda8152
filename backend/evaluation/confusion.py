"""A per-class confusion matrix with "missed" and "background", so people see *which* classes are confused.

Matching is supervision's ``ConfusionMatrix`` rule (the kept library's, not ours): per image, every
(true, predicted) pair with IoU above ``iou_threshold`` regardless of class is a candidate; same-class
pairs first, then by IoU descending, each box matched at most once. A cross-class match counts as a
confusion, an unmatched true box as "missed" (last column), an unmatched prediction scoring at least
``score_threshold`` as "background" (last row). Labels outside ``classes`` are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import supervision as sv

from backend.core.detections import Detections

IOU_THRESHOLD = 0.5


def _rows(det: Detections, cid: dict[str, int], with_scores: bool) -> np.ndarray:
    keep = [k for k, label in enumerate(det.labels) if label in cid]
    cols = 6 if with_scores else 5
    if not keep:
        return np.zeros((0, cols), dtype=np.float32)
    out = np.zeros((len(keep), cols), dtype=np.float32)
    out[:, :4] = det.xyxy[keep]
    out[:, 4] = [cid[det.labels[k]] for k in keep]
    if with_scores:
        out[:, 5] = det.scores[keep]
    return out


def confusion_matrix(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str],
                     score_threshold: float = 0.0, iou_threshold: float = IOU_THRESHOLD) -> dict:
    """``{"classes", "rows", "columns", "matrix", ...}``: ``matrix[i][j]`` counts true ``rows[i]`` predicted as
    ``columns[j]``; rows end with "background" (predictions matching no true box), columns with "missed"."""
    classes = list(classes)
    cid = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes) + 1, len(classes) + 1), dtype=int)
    if classes and pairs:
        cm = sv.ConfusionMatrix.from_tensors(
            predictions=[_rows(p, cid, True) for p, _ in pairs], targets=[_rows(g, cid, False) for _, g in pairs],
            classes=classes, conf_threshold=score_threshold, iou_threshold=iou_threshold)
        matrix = np.asarray(cm.matrix, dtype=int)
    return {"classes": classes, "rows": [*classes, "background"], "columns": [*classes, "missed"],
            "matrix": matrix.tolist(), "iou_threshold": iou_threshold, "score_threshold": score_threshold,
            "n_images": len(pairs)}
