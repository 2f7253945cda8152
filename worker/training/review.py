"""The evaluation a person can act on, stored after each training for the status page.

Runs inside the training job's evaluation step on the gate's own predictions of the served model on
the held-out tasks (no second YOLO pass) and the stored Gemini drafts of the same tasks, against the
same human labels (held-out tasks are human-annotated only). Everything is in original image pixels.
Bounded: one Detections per held-out task and source, a capped candidate list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask
from backend.evaluation.confusion import confusion_matrix
from backend.evaluation.label_errors import label_errors
from backend.evaluation.metrics import detection_metrics
from worker.training.dataset import DatasetItem
from worker.training.gate import draft_detections, human_held_out

log = logging.getLogger(__name__)

STORED_LABEL_ERRORS = 20
CLASS_FIGURES = ("ap50", "ap50_95", "precision", "recall", "n_gt", "n_pred")


def to_original(det: Detections, item: DatasetItem) -> Detections:
    """A prediction on the saved (resized) image, in the original image's pixels."""
    scale = np.array([item.orig_width / item.width, item.orig_height / item.height] * 2, dtype=float)
    return Detections(det.xyxy * scale, list(det.labels), det.scores, (item.orig_width, item.orig_height),
                      det.source, det.model)


def source_figures(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str], threshold: float) -> dict:
    """mAP50, mAP50-95, P/R at ``threshold`` and per-class AP / P / R of one source."""
    m = detection_metrics(pairs, classes, score_threshold=threshold)
    return {"map50": m.map50, "map50_95": m.map50_95, "precision": m.precision, "recall": m.recall,
            "score_threshold": threshold, "n_images": m.n_images, "n_gt": m.n_gt, "n_pred": m.n_pred,
            "per_class": m.per_class}


def side_by_side(by_source: dict[str, list[tuple[Detections, Detections]]], classes: Sequence[str],
                 thresholds: dict[str, float]) -> dict:
    """Each source's figures on the same tasks (callers pass pairs of the same tasks, same truth)."""
    return {source: source_figures(pairs, classes, thresholds.get(source, 0.0)) for source, pairs in by_source.items() if pairs}


def review(items: Sequence[DatasetItem], yolo_predictions: Sequence[Detections], tasks: Sequence[AnnotatedTask],
           config: ProjectConfig, *, version: str | None, project: str, yolo_threshold: float,
           label_studio_url: str = "", min_score: float = 0.5, limit: int = STORED_LABEL_ERRORS) -> dict:
    """The ``evaluation`` field of ``lsb:quality:<project>``.

    ``yolo_predictions`` are the served model's boxes on ``items`` (saved pixels, as the gate made
    them). Side by side compares YOLO and Gemini on the held-out tasks that have a Gemini draft;
    the confusion matrix and label errors are the YOLO model's on every held-out task.
    """
    items = human_held_out(items)
    classes = config.class_names
    by_id = {t.id: t for t in tasks}
    yolo_all: list[tuple[Detections, Detections]] = []
    pairs: dict[str, list[tuple[Detections, Detections]]] = {"yolo": [], "gemini": []}
    triples = []
    for item, pred in zip(items, yolo_predictions):
        truth = item.ground_truth(saved=False)
        yolo = to_original(pred, item)
        yolo_all.append((yolo, truth))
        triples.append((item.task_id, yolo, truth))
        task = by_id.get(item.task_id)
        gemini = draft_detections(task, config, (item.orig_width, item.orig_height)).get("gemini") if task else None
        if gemini is not None:
            pairs["gemini"].append((gemini, truth))
            pairs["yolo"].append((yolo, truth))
    thresholds = {"yolo": yolo_threshold, "gemini": 0.0}
    compared = side_by_side(pairs, classes, thresholds)
    if "gemini" not in compared and yolo_all:  # no Gemini draft on any held-out task: YOLO alone on all of them
        compared = side_by_side({"yolo": yolo_all}, classes, thresholds)
    per_class = {c: {source: {k: figures["per_class"][c].get(k) for k in CLASS_FIGURES if k in figures["per_class"][c]}
                     for source, figures in compared.items()} for c in classes}
    return {
        "version": version,
        "measured_at": round(time.time(), 3),
        "tasks": len(items),
        "compared_tasks": len(pairs["gemini"]) or len(yolo_all),
        "per_class": per_class,
        "side_by_side": {s: {k: v for k, v in f.items() if k != "per_class"} for s, f in compared.items()},
        "confusion": confusion_matrix(yolo_all, classes, score_threshold=yolo_threshold),
        "label_errors": label_errors(triples, min_score, project=project, label_studio_url=label_studio_url, limit=limit),
    }


def review_after_gate(decision, dataset, tasks, config: ProjectConfig, settings, project: str,
                      version: str | None) -> dict | None:
    """:func:`review` of the training job's gate decision with the deployment's thresholds and Label Studio URL.

    An extra for people: without the gate's predictions it is None, and a failure is logged, never fails the training.
    """
    if not decision.predictions:
        return None
    try:
        return review(dataset.val_items, decision.predictions, tasks, config, version=version, project=project,
                      yolo_threshold=config.score_threshold(float(settings.yolo_score_threshold)),
                      label_studio_url=settings.label_studio_url)
    except Exception as exc:  # noqa: BLE001 - the review is for people; the training result stands without it
        log.warning("project %s: evaluation review failed: %s: %s", project, type(exc).__name__, exc)
        return None
