"""Label-error candidates: annotations the promoted model contradicts with high confidence.

An annotator reviews each one in Label Studio (the link opens the task in the project's Data Manager).
Kinds, strongest first:

- ``missed_label``: a model box scoring >= ``min_score`` that overlaps no true box of any class at
  IoU >= 0.5 (the object is probably there and nobody labeled it);
- ``wrong_class``: a model box scoring >= ``min_score`` on a true box of another class (IoU >= 0.5)
  while no true box of its own class is there (the label is probably wrong);
- ``spurious_label`` (weaker): a true box no model box overlaps at IoU >= 0.5 at any score, on an image
  where the model is confident elsewhere (the box may be a mistake, or the model's blind spot).

Ranked by the model's confidence (weaker kind last), capped at ``limit``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from backend.core import geometry
from backend.core.detections import Detections

IOU = 0.5
STRONG = ("missed_label", "wrong_class")


def task_link(label_studio_url: str, project: str | int, task_id: int | str) -> str | None:
    """The task opened in Label Studio's Data Manager, or None without a configured URL."""
    if not label_studio_url:
        return None
    return f"{label_studio_url.rstrip('/')}/projects/{project}/data?task={task_id}"


def _candidate(task_id, kind: str, labels: dict, box: np.ndarray, score: float, link: str | None) -> dict:
    return {"task_id": task_id, "kind": kind, **labels, "box": [round(float(v), 1) for v in box],
            "score": round(float(score), 4), "link": link}


def image_candidates(task_id, pred: Detections, truth: Detections, min_score: float, link: str | None = None) -> list[dict]:
    """Candidates on one image (``pred`` and ``truth`` in the same pixels)."""
    out: list[dict] = []
    confident = np.flatnonzero(pred.scores >= min_score) if len(pred) else np.zeros(0, dtype=int)
    iou = geometry.box_iou(pred.xyxy, truth.xyxy) if len(pred) and len(truth) else np.zeros((len(pred), len(truth)))
    for k in confident:
        overlaps = np.flatnonzero(iou[k] >= IOU) if len(truth) else np.zeros(0, dtype=int)
        if not overlaps.size:
            out.append(_candidate(task_id, "missed_label", {"predicted": pred.labels[k]}, pred.xyxy[k], pred.scores[k], link))
        elif not any(truth.labels[j] == pred.labels[k] for j in overlaps):
            j = overlaps[np.argmax(iou[k, overlaps])]
            out.append(_candidate(task_id, "wrong_class", {"predicted": pred.labels[k], "labeled": truth.labels[j]},
                                  truth.xyxy[j], pred.scores[k], link))
    if confident.size and len(truth):
        top = float(pred.scores[confident].max())
        for j in range(len(truth)):
            if not (iou[:, j] >= IOU).any():
                out.append(_candidate(task_id, "spurious_label", {"labeled": truth.labels[j]}, truth.xyxy[j], top, link))
    return out


def label_errors(items: Iterable[tuple[int | str, Detections, Detections]], min_score: float, *, project: str | int = "",
                 label_studio_url: str = "", limit: int = 50) -> list[dict]:
    """Ranked candidates over ``(task_id, prediction, truth)`` triples: strong kinds first, then by score."""
    found: list[dict] = []
    for task_id, pred, truth in items:
        found.extend(image_candidates(task_id, pred, truth, min_score, task_link(label_studio_url, project, task_id)))
    found.sort(key=lambda c: (c["kind"] not in STRONG, -c["score"]))
    return found[:limit]
