"""Detection metrics, the promotion gate, and the quality of stored drafts.

One metric implementation serves everything: :func:`evaluate_detections` scores any
:class:`~backend.core.detections.Detections` against ground truth (also a ``Detections``, from the
final human labels), pure numpy, IoU from :func:`backend.core.geometry.box_iou`:

- AP per class with COCO's 101-point interpolated precision envelope; mAP50 at IoU 0.5 and
  mAP50-95 averaged over IoU 0.50:0.05:0.95, classes without ground truth left out;
- precision / recall at IoU 0.5 over detections scoring at least ``score_threshold``;
- greedy matching per image and class, best score first, each prediction to the unmatched ground
  truth box of highest IoU (COCO's rule).

The gate evaluates the candidate and the current checkpoint the same way on the same held-out
tasks (predictions on the saved val images, model classes mapped to label-config labels by name,
so a model trained under an older label config is still compared fairly) and promotes when there is
no current model or the candidate's mAP50-95 beats the current's by more than ``PROMOTE_MIN_GAIN``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from backend.core.detections import Detections
from backend.core.geometry import box_iou
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask, StoredPrediction
from worker.training.dataset import DatasetItem, DatasetResult, parse_regions

log = logging.getLogger(__name__)

COCO_IOUS = np.round(np.linspace(0.5, 0.95, 10), 2)
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


# --- metrics -----------------------------------------------------------------------------------

@dataclass
class DetectionMetrics:
    map50: float
    map50_95: float
    precision: float
    recall: float
    n_images: int
    n_gt: int
    n_pred: int
    tp50: int
    per_class: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _match(pred: Detections, gt: Detections, ious: np.ndarray) -> np.ndarray:
    """``(n_pred, n_thresholds)`` booleans: prediction i is a true positive at threshold j."""
    tp = np.zeros((len(pred), len(ious)), dtype=bool)
    if not len(pred) or not len(gt):
        return tp
    overlap = box_iou(pred.xyxy, gt.xyxy)
    same = np.array(pred.labels, dtype=object)[:, None] == np.array(gt.labels, dtype=object)[None, :]
    overlap = np.where(same, overlap, -1.0)
    order = np.argsort(-pred.scores, kind="stable")
    for j, threshold in enumerate(ious):
        taken = np.zeros(len(gt), dtype=bool)
        for i in order:
            candidates = np.where(taken, -1.0, overlap[i])
            k = int(np.argmax(candidates))
            if candidates[k] >= threshold - 1e-9:
                taken[k] = True
                tp[i, j] = True
    return tp


def average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> np.ndarray:
    """COCO 101-point AP for each column of ``tp`` (one per IoU threshold)."""
    if n_gt == 0:
        return np.full(tp.shape[1] if tp.ndim == 2 else 1, np.nan)
    if tp.shape[0] == 0:
        return np.zeros(tp.shape[1])
    order = np.argsort(-scores, kind="stable")
    tp = tp[order].astype(float)
    ctp = np.cumsum(tp, axis=0)
    cfp = np.cumsum(1.0 - tp, axis=0)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
    out = np.zeros(tp.shape[1])
    for j in range(tp.shape[1]):
        envelope = np.maximum.accumulate(precision[::-1, j])[::-1]
        idx = np.searchsorted(recall[:, j], _RECALL_POINTS, side="left")
        sampled = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
        out[j] = float(sampled.mean())
    return out


def evaluate_detections(
    pairs: Iterable[tuple[Detections, Detections]],
    classes: Sequence[str] | None = None,
    iou_thresholds: Sequence[float] = COCO_IOUS,
    score_threshold: float = 0.0,
) -> DetectionMetrics:
    """Score predictions against ground truth: ``pairs`` of ``(predicted, truth)`` per image.

    ``classes`` fixes which classes enter the mean (default: every class with ground truth).
    Precision/recall count predictions with ``score >= score_threshold``; AP uses all of them.
    """
    ious = np.asarray(iou_thresholds, dtype=float)
    i50 = int(np.argmin(np.abs(ious - 0.5)))
    tps: dict[str, list[np.ndarray]] = defaultdict(list)
    scores: dict[str, list[np.ndarray]] = defaultdict(list)
    n_gt: dict[str, int] = defaultdict(int)
    n_images = tp50 = n_pred_kept = n_gt_total = 0
    for pred, gt in pairs:
        n_images += 1
        tp = _match(pred, gt, ious)
        labels = np.array(pred.labels, dtype=object)
        for label in set(pred.labels):
            sel = labels == label
            tps[label].append(tp[sel])
            scores[label].append(pred.scores[sel])
        for label in gt.labels:
            n_gt[label] += 1
        kept = pred.scores >= score_threshold
        n_pred_kept += int(kept.sum())
        tp50 += int(tp[kept, i50].sum()) if len(pred) else 0
        n_gt_total += len(gt)
    names = list(classes) if classes is not None else sorted(set(n_gt) | set(tps))
    per_class: dict[str, dict] = {}
    ap_rows = []
    for name in names:
        tp = np.concatenate(tps[name]) if tps.get(name) else np.zeros((0, len(ious)), dtype=bool)
        sc = np.concatenate(scores[name]) if scores.get(name) else np.zeros(0)
        ap = average_precision(tp, sc, n_gt.get(name, 0))
        per_class[name] = {
            "ap50": None if np.isnan(ap[i50]) else round(float(ap[i50]), 6),
            "ap50_95": None if np.all(np.isnan(ap)) else round(float(np.mean(ap)), 6),
            "n_gt": int(n_gt.get(name, 0)),
            "n_pred": len(sc),
        }
        if n_gt.get(name, 0):
            ap_rows.append(ap)
    if ap_rows:
        table = np.vstack(ap_rows)
        map50, map50_95 = float(table[:, i50].mean()), float(table.mean())
    else:
        map50 = map50_95 = 0.0
    precision = tp50 / n_pred_kept if n_pred_kept else (1.0 if n_gt_total == 0 else 0.0)
    recall = tp50 / n_gt_total if n_gt_total else 1.0
    return DetectionMetrics(
        map50=round(map50, 6), map50_95=round(map50_95, 6), precision=round(precision, 6), recall=round(recall, 6),
        n_images=n_images, n_gt=n_gt_total, n_pred=sum(int(np.concatenate(v).size) if v else 0 for v in scores.values()),
        tp50=tp50, per_class=per_class,
    )


# --- models ------------------------------------------------------------------------------------

def _threads() -> int:
    return max(1, os.cpu_count() or 1)


def predict_items(
    checkpoint: Path | str,
    items: Sequence[DatasetItem],
    config: ProjectConfig,
    imgsz: int | None = None,
    device: str = "cpu",
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
) -> list[Detections]:
    """Run a checkpoint on the dataset's saved images; labels mapped to label-config labels by name."""
    from backend.core.ultralytics_env import prepare

    prepare()
    import torch
    from ultralytics import YOLO

    if not Path(checkpoint).is_file():  # YOLO() would try to download a missing .pt
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    model = YOLO(str(checkpoint))
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    mapping = {int(k): (v if v in config.class_names else config.match_label(v)) for k, v in names.items()}
    size = int(imgsz or model.overrides.get("imgsz") or 640)
    out: list[Detections] = []
    for n, item in enumerate(items):
        result = model.predict(str(item.image_path), imgsz=size, conf=conf, iou=iou, max_det=max_det,
                               device=device, verbose=False)[0]
        if n == 0:
            torch.set_num_threads(_threads())  # the predictor's select_device set 1 thread on 2 cores
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy() if len(boxes) else np.zeros((0, 4))
        cls = boxes.cls.cpu().numpy().astype(int) if len(boxes) else np.zeros(0, dtype=int)
        confs = boxes.conf.cpu().numpy() if len(boxes) else np.zeros(0)
        keep = [i for i, c in enumerate(cls) if mapping.get(int(c))]
        out.append(Detections(xyxy[keep], [mapping[int(cls[i])] for i in keep], confs[keep],
                              (item.width, item.height), "yolo", str(checkpoint)))
    return out


def evaluate_checkpoint(
    checkpoint: Path | str,
    dataset: DatasetResult,
    config: ProjectConfig,
    device: str = "cpu",
    imgsz: int | None = None,
    score_threshold: float = 0.25,
) -> dict:
    """mAP50-95, mAP50, P/R (at ``score_threshold``) of a checkpoint on the dataset's val split."""
    started = time.monotonic()
    items = dataset.val_items
    preds = predict_items(checkpoint, items, config, imgsz=imgsz, device=device)
    metrics = evaluate_detections(zip(preds, (i.ground_truth(saved=True) for i in items)),
                                  classes=config.class_names, score_threshold=score_threshold)
    out = metrics.to_dict()
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate: dict
    current: dict | None
    gain: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def gate(candidate: dict, current: dict | None, min_gain: float) -> GateDecision:
    """Promote when there is no current model or candidate mAP50-95 > current + ``min_gain``."""
    if current is None:
        return GateDecision(True, "no current model", candidate, None, None)
    gain = float(candidate["map50_95"]) - float(current["map50_95"])
    if gain > min_gain:
        return GateDecision(True, f"mAP50-95 {candidate['map50_95']:.4f} > current {current['map50_95']:.4f} + {min_gain}", candidate, current, gain)
    return GateDecision(False, f"mAP50-95 {candidate['map50_95']:.4f} does not beat current {current['map50_95']:.4f} + {min_gain}", candidate, current, gain)


def evaluate_gate(
    candidate: Path | str,
    current: Path | str | None,
    dataset: DatasetResult,
    config: ProjectConfig,
    min_gain: float,
    device: str = "cpu",
) -> GateDecision:
    cand = evaluate_checkpoint(candidate, dataset, config, device=device)
    cur = None
    if current is not None:
        try:
            cur = evaluate_checkpoint(current, dataset, config, device=device)
        except Exception as exc:  # an unloadable current model must not block a good candidate
            log.warning("could not evaluate the current model %s: %s", current, exc)
            cur = None
    return gate(cand, cur, min_gain)


# --- drafts ------------------------------------------------------------------------------------

def _prediction_order(pred: StoredPrediction) -> tuple:
    return (pred.created_at or "", pred.id or 0)


def draft_detections(task: AnnotatedTask, config: ProjectConfig, size: tuple[int, int]) -> dict[str, Detections]:
    """The latest stored draft of each source for one task (source -> Detections, original pixels)."""
    out: dict[str, Detections] = {}
    for pred in sorted(task.predictions, key=_prediction_order, reverse=True):
        boxes = parse_regions(pred.result, config, size, source_of=pred.region_source, dedupe=False,
                              default_score=pred.score if pred.score is not None else 1.0)
        sources = set(boxes.sources) or {pred.source}
        for source in sources:
            if source in out:
                continue
            keep = [i for i, s in enumerate(boxes.sources) if s == source]
            out[source] = Detections(boxes.xyxy[keep], [boxes.labels[i] for i in keep], boxes.scores[keep],
                                     size, source, pred.model_version)
    return out


def draft_quality(tasks: Sequence[AnnotatedTask], items: Sequence[DatasetItem], config: ProjectConfig) -> dict[str, dict]:
    """Per source: precision / recall at IoU 0.5 and mAP50 of stored drafts vs the final labels.

    ``items`` are the held-out dataset items (their ground truth is the human annotation);
    ``n`` counts the tasks that had a draft of that source.
    """
    by_id = {t.id: t for t in tasks}
    pairs: dict[str, list[tuple[Detections, Detections]]] = defaultdict(list)
    for item in items:
        task = by_id.get(item.task_id)
        if task is None or not task.predictions:
            continue
        truth = item.ground_truth(saved=False)
        for source, drafts in draft_detections(task, config, (item.orig_width, item.orig_height)).items():
            pairs[source].append((drafts, truth))
    out: dict[str, dict] = {}
    for source, source_pairs in sorted(pairs.items()):
        m = evaluate_detections(source_pairs, classes=config.class_names, iou_thresholds=[0.5])
        out[source] = {"precision": m.precision, "recall": m.recall, "map50": m.map50, "n": m.n_images,
                       "n_gt": m.n_gt, "n_pred": m.n_pred}
    return out
