"""The one evaluation of detections against human labels: pycocotools' COCOeval.

Ground truth comes from :mod:`backend.evaluation.truth` (files) or the training dataset (Label
Studio annotations). Predictions are :class:`~backend.core.detections.Detections` from any source.
The promotion gate, the training job's draft-quality figures, ``lsb eval``/``lsb train`` and the
benchmarks all score through this module, so their numbers agree. COCOeval runs with
``maxDets = (1, 10, MAX_DET)``, the serving detector's own limit per image (COCO's default of 100
would ignore boxes the detector serves on crowded images).

:func:`detection_metrics` gives the compact figures the gate compares (mAP50, mAP50-95, and
precision / recall at IoU 0.5 over the predictions scoring at least ``score_threshold``, read from
COCOeval's own matching). :func:`evaluate` computes, over ``(prediction, truth)`` pairs of one image each:

- ``coco``: mAP50-95, mAP50, mAP75, mAP and AR by object size (small < 32², medium < 96², large;
  the area is the mask's when the truth has masks, else the box's);
- ``gate``: the :func:`detection_metrics` figures, as a version's ``meta.json`` records them;
- ``per_class``: AP50 / AP50-95, precision / recall at IoU 0.5 and ``score_threshold`` (``tp50`` of
  ``n_kept`` predictions kept, ``n_gt`` true boxes; None where a ratio is 0/0, unlike the overall
  figures, which keep the gate's rule), counts;
- ``iou``: for every true box, the IoU of the best predicted box of the same label (0 = missed):
  histogram, mean, median, share >= 0.5;
- ``sizes``: per size bucket, the number of true boxes, recall at IoU 0.5, mean best IoU and mAP;
- ``masks`` (both sides have masks): segm mAP (pycocotools), instance mIoU and Dice over true
  objects whose best box matches at IoU >= 0.5, and semantic (per class, pixels of all instances)
  mIoU and Dice;
- ``speed``: images per second over the wall time and per-image latency percentiles.

:func:`backend.evaluation.report.write_report` turns the result into a Markdown report with plots.
Conversions: :mod:`backend.core.geometry`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.core import geometry
from backend.core.detections import Detections
from backend.detectors.yolo import MAX_DET

log = logging.getLogger(__name__)

SMALL = 32 ** 2
MEDIUM = 96 ** 2
SIZES = ("small", "medium", "large")
IOU_BINS = np.round(np.linspace(0.0, 1.0, 21), 2)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _none_if_negative(value: float) -> float | None:
    return None if value is None or value < 0 else round(float(value), 6)


_EMPTY_COCO = {"map50_95": 0.0, "map50": 0.0, "map75": 0.0, **{f"map_{s}": None for s in SIZES},
               "ar1": 0.0, "ar10": 0.0, "ar_max_det": 0.0, **{f"ar_{s}": None for s in SIZES}, "per_class": {}, "pr_curve": None}


def _run_cocoeval(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str], iou_type: str,
                  max_det: int) -> tuple[COCOeval | None, str | None]:
    """COCOeval evaluated and accumulated over the pairs (labels outside ``classes`` ignored), or a note why not."""
    cid = {name: i + 1 for i, name in enumerate(classes)}
    images, gts, dts = [], [], []
    segm = iou_type == "segm"
    for image_id, (pred, gt) in enumerate(pairs, start=1):
        width, height = gt.image_size if gt.image_size != (0, 0) else pred.image_size
        images.append({"id": image_id, "width": int(width), "height": int(height), "file_name": str(image_id)})
        for k, label in enumerate(gt.labels):
            if label not in cid:
                continue
            bbox = geometry.xyxy_to_coco(gt.xyxy[k])
            ann = {"id": len(gts) + 1, "image_id": image_id, "category_id": cid[label], "bbox": bbox, "iscrowd": 0,
                   "area": float(gt.masks[k].sum()) if gt.masks is not None else bbox[2] * bbox[3]}
            if segm:
                ann["segmentation"] = geometry.mask_to_rle(gt.masks[k])
            gts.append(ann)
        for k, label in enumerate(pred.labels):
            if label not in cid:
                continue
            det = {"image_id": image_id, "category_id": cid[label], "score": float(pred.scores[k])}
            if segm:
                det["segmentation"] = geometry.mask_to_rle(pred.masks[k])
            else:
                det["bbox"] = geometry.xyxy_to_coco(pred.xyxy[k])
            dts.append(det)
    if not gts:
        return None, "no ground-truth objects"
    if not dts:
        return None, "no predictions"
    gt_api = COCO()
    gt_api.dataset = {"images": images, "annotations": gts, "categories": [{"id": i, "name": n} for n, i in cid.items()]}
    _quiet(gt_api.createIndex)
    dt_api = _quiet(gt_api.loadRes, dts)
    evaluator = COCOeval(gt_api, dt_api, iou_type)
    evaluator.params.maxDets = [1, 10, int(max_det)]
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    return evaluator, None


def _mean_valid(values: np.ndarray) -> float | None:
    """COCO's average over the cells that exist (-1 marks a class without ground truth)."""
    valid = values[values > -1]
    return round(float(valid.mean()), 6) if valid.size else None


def _summary(evaluator: COCOeval) -> dict:
    """COCO's twelve summary figures and per-class AP, all at the last ``maxDets`` (pycocotools'
    ``summarize`` reads mAP50-95 at a hard-coded 100 detections, so it is not used)."""
    precision = evaluator.eval["precision"]  # [T iou, R 101 recall points, K classes, A areas, M maxDets]
    recall = evaluator.eval["recall"]  # [T, K, A, M]
    areas = {label: i for i, label in enumerate(evaluator.params.areaRngLbl)}
    t50, t75 = (int(np.argmin(np.abs(evaluator.params.iouThrs - t))) for t in (0.5, 0.75))
    out: dict[str, Any] = {
        "map50_95": _mean_valid(precision[:, :, :, 0, -1]) or 0.0,
        "map50": _mean_valid(precision[t50, :, :, 0, -1]) or 0.0,
        "map75": _mean_valid(precision[t75, :, :, 0, -1]) or 0.0,
        **{f"map_{s}": _mean_valid(precision[:, :, :, areas[s], -1]) for s in SIZES},
        "ar1": _mean_valid(recall[:, :, 0, 0]), "ar10": _mean_valid(recall[:, :, 0, 1]),
        "ar_max_det": _mean_valid(recall[:, :, 0, -1]),
        **{f"ar_{s}": _mean_valid(recall[:, :, areas[s], -1]) for s in SIZES},
    }
    names = {c: n for n, c in ((cat["name"], cat["id"]) for cat in evaluator.cocoGt.dataset["categories"])}
    out["per_class"] = {
        names[c]: {"ap50_95": _mean_valid(precision[:, :, k, 0, -1]), "ap50": _mean_valid(precision[t50, :, k, 0, -1])}
        for k, c in enumerate(evaluator.params.catIds)}
    curve = precision[t50, :, :, 0, -1]
    valid = curve > -1
    pr = None
    if valid.any():
        mean = np.where(valid.any(axis=1), np.where(valid, curve, 0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan)
        pr = {"recall": [round(float(r), 2) for r in evaluator.params.recThrs],
              "precision": [None if np.isnan(v) else round(float(v), 6) for v in mean]}
    out["pr_curve"] = pr
    return out


def coco_eval(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str], iou_type: str = "bbox",
              max_det: int = MAX_DET) -> dict:
    """pycocotools COCOeval over the pairs: summary figures, per-class AP and the PR curve at IoU 0.5."""
    evaluator, note = _run_cocoeval(pairs, classes, iou_type, max_det)
    if evaluator is None:
        return {**_EMPTY_COCO, "max_det": int(max_det), "note": note}
    return {**_summary(evaluator), "max_det": int(max_det)}


def _true_positives_at_50(evaluator: COCOeval | None, pairs: Sequence[tuple[Detections, Detections]],
                          classes: Sequence[str], score_threshold: float) -> dict[str, tuple[int, int]]:
    """Per class: (true positives at IoU 0.5, predictions kept) among predictions scoring >= ``score_threshold``.

    Read from COCOeval's own greedy matching (best score first, each prediction to the unmatched
    true box of highest IoU): thresholding after matching equals matching only the kept predictions.
    Per class, so the per-class precision / recall and the overall ones come from one count.
    """
    counts = {c: [0, 0] for c in classes}
    if evaluator is None:  # no truth or no prediction: nothing matches
        for pred, _ in pairs:
            for label, score in zip(pred.labels, pred.scores):
                if label in counts and score >= score_threshold:
                    counts[label][1] += 1
        return {c: (tp, kept) for c, (tp, kept) in counts.items()}
    t50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    whole = evaluator.params.areaRng[0]
    name_of = {cat["id"]: cat["name"] for cat in evaluator.cocoGt.dataset["categories"]}
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != whole:
            continue
        above = np.asarray(entry["dtScores"], dtype=float) >= score_threshold
        row = counts[name_of[entry["category_id"]]]
        row[1] += int(above.sum())
        row[0] += int(((np.asarray(entry["dtMatches"])[t50] > 0) & above).sum())
    return {c: (tp, kept) for c, (tp, kept) in counts.items()}


@dataclass
class DetectionMetrics:
    """The figures the promotion gate compares and a version's ``meta.json`` records."""

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


def _detection_metrics(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str], score_threshold: float,
                       max_det: int) -> tuple[DetectionMetrics, dict]:
    evaluator, note = _run_cocoeval(pairs, classes, "bbox", max_det)
    coco = {**_summary(evaluator), "max_det": int(max_det)} if evaluator is not None else \
        {**_EMPTY_COCO, "max_det": int(max_det), "note": note}
    counts = _true_positives_at_50(evaluator, pairs, classes, score_threshold)
    tp50, kept = sum(tp for tp, _ in counts.values()), sum(k for _, k in counts.values())
    known = set(classes)
    n_gt = {c: 0 for c in classes}
    n_pred = {c: 0 for c in classes}
    for pred, gt in pairs:
        for label in gt.labels:
            if label in known:
                n_gt[label] += 1
        for label in pred.labels:
            if label in known:
                n_pred[label] += 1
    total_gt = sum(n_gt.values())
    per_class = {c: {"ap50": coco["per_class"].get(c, {}).get("ap50"), "ap50_95": coco["per_class"].get(c, {}).get("ap50_95"),
                     "precision": round(counts[c][0] / counts[c][1], 6) if counts[c][1] else None,
                     "recall": round(counts[c][0] / n_gt[c], 6) if n_gt[c] else None,
                     "n_gt": n_gt[c], "n_pred": n_pred[c], "tp50": counts[c][0], "n_kept": counts[c][1]} for c in classes}
    metrics = DetectionMetrics(
        map50=round(float(coco["map50"]), 6), map50_95=round(float(coco["map50_95"]), 6),
        precision=round(tp50 / kept, 6) if kept else (1.0 if total_gt == 0 else 0.0),
        recall=round(tp50 / total_gt, 6) if total_gt else 1.0,
        n_images=len(pairs), n_gt=total_gt, n_pred=sum(n_pred.values()), tp50=tp50, per_class=per_class)
    return metrics, coco


def detection_metrics(pairs: Iterable[tuple[Detections, Detections]], classes: Sequence[str], score_threshold: float = 0.0,
                      max_det: int = MAX_DET) -> DetectionMetrics:
    """mAP50-95, mAP50 (pycocotools), and precision / recall at IoU 0.5 over predictions scoring at
    least ``score_threshold``; mAP uses every prediction. Classes without ground truth stay out of the mean."""
    return _detection_metrics(list(pairs), list(classes), score_threshold, max_det)[0]


def best_ious(pred: Detections, gt: Detections) -> tuple[np.ndarray, np.ndarray]:
    """For each true box: the IoU of the best same-label predicted box (0 if none) and its index (-1)."""
    if not len(gt):
        return np.zeros(0), np.zeros(0, dtype=int)
    if not len(pred):
        return np.zeros(len(gt)), np.full(len(gt), -1)
    iou = geometry.box_iou(gt.xyxy, pred.xyxy)
    same = np.array(gt.labels, dtype=object)[:, None] == np.array(pred.labels, dtype=object)[None, :]
    iou = np.where(same, iou, 0.0)
    idx = iou.argmax(axis=1)
    best = iou[np.arange(len(gt)), idx]
    return best, np.where(best > 0, idx, -1)


def size_bucket(area: float) -> str:
    return "small" if area < SMALL else "medium" if area < MEDIUM else "large"


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


def evaluate(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str], *,
             latencies: Sequence[float] | None = None, wall_seconds: float | None = None,
             score_threshold: float = 0.0, max_det: int = MAX_DET) -> dict:
    """Every metric of the module docstring; JSON-safe."""
    pairs = [(p, g if g.image_size != (0, 0) else replace(g, image_size=p.image_size)) for p, g in pairs]
    classes = list(classes)
    gate, coco = _detection_metrics(pairs, classes, score_threshold, max_det)

    all_best: list[float] = []
    by_size: dict[str, list[float]] = {s: [] for s in SIZES}
    mask_iou: list[float] = []
    mask_dice: list[float] = []
    inter: dict[str, float] = {c: 0.0 for c in classes}
    union: dict[str, float] = {c: 0.0 for c in classes}
    total: dict[str, float] = {c: 0.0 for c in classes}
    with_masks = bool(pairs) and all(g.masks is not None or not len(g) for _, g in pairs) and \
        all(p.masks is not None or not len(p) for p, _ in pairs) and any(g.masks is not None for _, g in pairs)
    for pred, gt in pairs:
        best, idx = best_ious(pred, gt)
        all_best.extend(best.tolist())
        areas = geometry.box_area(gt.xyxy) if gt.masks is None else gt.masks.reshape(len(gt), -1).sum(axis=1)
        for value, area in zip(best, areas):
            by_size[size_bucket(float(area))].append(float(value))
        if not with_masks:
            continue
        for k in range(len(gt)):
            if best[k] >= 0.5 and idx[k] >= 0 and pred.masks is not None:
                g, p = gt.masks[k], pred.masks[idx[k]]
                i, u, s = float((g & p).sum()), float((g | p).sum()), float(g.sum() + p.sum())
                mask_iou.append(i / u if u else 0.0)
                mask_dice.append(2 * i / s if s else 0.0)
        height, width = (gt.masks.shape[1:] if gt.masks is not None and len(gt) else (pred.image_size[1], pred.image_size[0]))
        for c in classes:
            g = _union(gt, c, width, height)
            p = _union(pred, c, width, height)
            inter[c] += float((g & p).sum())
            union[c] += float((g | p).sum())
            total[c] += float(g.sum() + p.sum())

    best_arr = np.array(all_best)
    counts, _ = np.histogram(best_arr, bins=IOU_BINS) if len(best_arr) else (np.zeros(len(IOU_BINS) - 1, dtype=int), None)
    per_class = gate.per_class
    out: dict[str, Any] = {
        "n_images": len(pairs),
        "n_gt": int(sum(len(g) for _, g in pairs)),
        "n_pred": int(sum(len(p) for p, _ in pairs)),
        "n_pred_unknown_label": int(sum(1 for p, _ in pairs for label in p.labels if label not in classes)),
        "classes": classes,
        "coco": {k: v for k, v in coco.items() if k not in ("per_class", "pr_curve")},
        "gate": {"map50": gate.map50, "map50_95": gate.map50_95, "precision": gate.precision, "recall": gate.recall,
                 "tp50": gate.tp50, "score_threshold": score_threshold},
        "per_class": per_class,
        "pr_curve": coco.get("pr_curve"),
        "iou": {
            "mean": round(float(best_arr.mean()), 6) if len(best_arr) else None,
            "median": round(float(np.median(best_arr)), 6) if len(best_arr) else None,
            "recall50": round(float((best_arr >= 0.5).mean()), 6) if len(best_arr) else None,
            "bins": IOU_BINS.tolist(),
            "counts": [int(c) for c in counts],
        },
        "sizes": {
            s: {"n_gt": len(v), "recall50": round(float(np.mean(np.array(v) >= 0.5)), 6) if v else None,
                "mean_iou": round(float(np.mean(v)), 6) if v else None, "map50_95": coco.get(f"map_{s}")}
            for s, v in by_size.items()
        },
        "masks": None,
        "speed": _speed(latencies, wall_seconds, len(pairs)),
    }
    if with_masks:
        segm = coco_eval(pairs, classes, "segm", max_det)
        present = [c for c in classes if union[c] > 0]
        out["masks"] = {
            "segm_map50_95": segm["map50_95"], "segm_map50": segm["map50"],
            "instance_miou": round(float(np.mean(mask_iou)), 6) if mask_iou else None,
            "instance_dice": round(float(np.mean(mask_dice)), 6) if mask_dice else None,
            "n_matched": len(mask_iou),
            "semantic_miou": round(float(np.mean([inter[c] / union[c] for c in present])), 6) if present else None,
            "semantic_dice": round(float(np.mean([2 * inter[c] / total[c] for c in present])), 6) if present else None,
            "per_class_iou": {c: round(inter[c] / union[c], 6) for c in present},
        }
    return out


def _union(det: Detections, label: str, width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    if det.masks is None:
        return mask
    for k, name in enumerate(det.labels):
        if name == label and det.masks[k].shape == mask.shape:
            mask |= det.masks[k]
    return mask


def _speed(latencies: Sequence[float] | None, wall: float | None, n: int) -> dict | None:
    if not latencies and not wall:
        return None
    lat = list(latencies or [])
    return {
        "images": n,
        "wall_s": round(float(wall), 3) if wall else None,
        "images_per_second": round(n / wall, 4) if wall else None,
        "latency_mean_s": round(float(np.mean(lat)), 4) if lat else None,
        "latency_p50_s": _percentile(lat, 50), "latency_p90_s": _percentile(lat, 90),
        "latency_p95_s": _percentile(lat, 95), "latency_max_s": round(float(max(lat)), 4) if lat else None,
        "latencies_s": [round(float(v), 4) for v in lat],
    }
