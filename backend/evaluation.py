"""COCO-style evaluation of drafts against human labels, and its Markdown report with plots.

Ground truth comes from a COCO json, a YOLO dataset folder (``data.yaml`` + ``images/`` +
``labels/``; boxes or segmentation polygons) or a Label Studio export (JSON list of tasks, the
latest non-skipped annotation of each; regions read by :func:`worker.dataset.parse_regions`, the
training dataset's own reader). Predictions are :class:`~backend.detections.Detections` from any
source. :func:`evaluate` computes, over ``(prediction, truth)`` pairs of one image each:

- ``coco``: mAP50-95, mAP50, mAP75, mAP and AR by object size (small < 32², medium < 96², large;
  the area is the mask's when the truth has masks, else the box's) from **pycocotools**' COCOeval,
  the reference implementation;
- ``gate``: mAP50, mAP50-95, precision and recall at ``score_threshold`` from
  :func:`worker.evaluate.evaluate_detections`, the code the training gate and the training job's
  draft-quality figures use, so the numbers here and in a version's ``meta.json`` agree;
- ``per_class``: AP50 / AP50-95 (pycocotools), precision / recall (worker.evaluate), counts;
- ``iou``: for every true box, the IoU of the best predicted box of the same label (0 = missed):
  histogram, mean, median, share >= 0.5;
- ``sizes``: per size bucket, the number of true boxes, recall at IoU 0.5, mean best IoU and mAP;
- ``masks`` (both sides have masks): segm mAP (pycocotools), instance mIoU and Dice over true
  objects whose best box matches at IoU >= 0.5, and semantic (per class, pixels of all instances)
  mIoU and Dice;
- ``speed``: images per second over the wall time and per-image latency percentiles.

:func:`write_report` writes ``report.md``, ``metrics.json`` and PNG plots (matplotlib's Agg
canvas, no display and no global backend switch) into a folder. Conversions: :mod:`backend.geometry`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from backend import geometry
from backend.detections import Detections

log = logging.getLogger(__name__)

SMALL = 32 ** 2
MEDIUM = 96 ** 2
SIZES = ("small", "medium", "large")
IOU_BINS = np.round(np.linspace(0.0, 1.0, 21), 2)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class TruthError(ValueError):
    """The ground truth file/folder cannot be read; the message says why."""


# --- ground truth -------------------------------------------------------------------------------

@dataclass
class TruthImage:
    """One image's human labels. ``truth.image_size`` is (0, 0) until known (LS tasks without regions)."""

    name: str
    truth: Detections
    path: Path | None = None
    url: str | None = None


@dataclass
class TruthSet:
    images: list[TruthImage]
    classes: list[str]
    kind: str
    origin: str
    label_config: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return bool(self.images) and all(i.truth.masks is not None or not len(i.truth) for i in self.images) and any(
            i.truth.masks is not None for i in self.images)


def load_truth(path: Path | str, *, images_root: Path | str | None = None, split: str = "val",
               label_config: str | None = None, document_root: Path | str | None = None) -> TruthSet:
    """A COCO json, a YOLO dataset folder (or its data.yaml), or a Label Studio export JSON."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".yaml", ".yml"):
        return load_yolo(path, split=split)
    if not path.is_file():
        raise TruthError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise TruthError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return load_coco(path, data, images_root=images_root)
    if isinstance(data, list) or (isinstance(data, dict) and "data" in data):
        return load_label_studio(path, data if isinstance(data, list) else [data], label_config=label_config,
                                 document_root=document_root, images_root=images_root)
    raise TruthError(f"{path}: neither a COCO json (images, annotations) nor a Label Studio export (a list of tasks)")


def load_coco(path: Path, data: dict | None = None, images_root: Path | str | None = None) -> TruthSet:
    data = data if data is not None else json.loads(Path(path).read_text())
    root = Path(images_root) if images_root else Path(path).parent
    cats = {int(c["id"]): str(c["name"]) for c in data.get("categories") or []}
    ordered = [cats[k] for k in sorted(cats)]
    anns: dict[int, list[dict]] = {}
    for ann in data.get("annotations") or []:
        anns.setdefault(int(ann["image_id"]), []).append(ann)
    images = []
    with_masks = bool(data.get("annotations")) and all(a.get("segmentation") for a in data["annotations"])
    for im in data.get("images") or []:
        width, height = int(im["width"]), int(im["height"])
        rows = [a for a in anns.get(int(im["id"]), []) if not a.get("iscrowd") and int(a["category_id"]) in cats]
        xyxy = np.array([geometry.coco_to_xyxy(a["bbox"]) for a in rows], dtype=float).reshape(-1, 4)
        masks = None
        if with_masks:
            masks = np.stack([geometry.coco_segmentation_to_mask(a["segmentation"], width, height) for a in rows]) if rows \
                else np.zeros((0, height, width), dtype=bool)
        file_name = str(im.get("file_name") or im["id"])
        local = root / file_name
        truth = Detections(xyxy, [cats[int(a["category_id"])] for a in rows], np.ones(len(rows)), (width, height), "human", "coco", masks)
        images.append(TruthImage(file_name, truth, local if local.is_file() else None,
                                 file_name if urlsplit(file_name).scheme in ("http", "https", "gs", "s3") else None))
    return TruthSet(images, ordered, "coco", str(path))


def read_data_yaml(path: Path) -> tuple[dict, list[str]]:
    """A YOLO data.yaml (JSON is YAML too) and its class names in index order."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    names = cfg.get("names") or {}
    classes = [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    return cfg, classes


def load_yolo(path: Path | str, split: str = "val") -> TruthSet:
    """A YOLO dataset: ``split`` is a data.yaml key (train / val / test) or ``all``."""
    path = Path(path)
    yaml_path = path if path.is_file() else next((path / n for n in ("data.yaml", "dataset.yaml") if (path / n).is_file()), None)
    if yaml_path is None:
        raise TruthError(f"{path} has no data.yaml")
    cfg, classes = read_data_yaml(yaml_path)
    base = Path(cfg.get("path") or yaml_path.parent)
    if not base.is_absolute():
        base = (yaml_path.parent / base).resolve()
    keys = ["train", "val", "test"] if split == "all" else [split]
    image_dirs: list[Path] = []
    for key in keys:
        value = cfg.get(key)
        for entry in ([value] if isinstance(value, str) else value or []):
            image_dirs.append((base / entry).resolve())
    if not image_dirs:
        raise TruthError(f"{yaml_path} has no {split!r} split")
    from PIL import Image

    images = []
    for folder in image_dirs:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for image_path in files:
            parts = list(image_path.parts)
            idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
            label_path = (Path(*parts[:idx], "labels", *parts[idx + 1:]) if idx is not None else image_path).with_suffix(".txt")
            with Image.open(image_path) as im:
                from PIL import ImageOps

                width, height = ImageOps.exif_transpose(im).size
            boxes, labels, masks, any_polygon = [], [], [], False
            lines = label_path.read_text().splitlines() if label_path.is_file() else []
            for line in lines:
                values = line.split()
                if len(values) < 5:
                    continue
                cls = int(float(values[0]))
                if cls >= len(classes):
                    continue
                if len(values) == 5:
                    box = geometry.yolo_to_xyxy([float(v) for v in values[1:5]], width, height)
                    masks.append(None)
                else:
                    pts = geometry.yolo_points_to_pixels([float(v) for v in values[1:]], width, height)
                    box = geometry.points_to_xyxy(pts)
                    masks.append(geometry.polygon_to_mask(pts, width, height))
                    any_polygon = True
                boxes.append(np.clip(box, 0, [width, height, width, height]))
                labels.append(classes[cls])
            mask_arr = None
            if any_polygon and all(m is not None for m in masks):
                mask_arr = np.stack(masks)
            truth = Detections(np.array(boxes, dtype=float).reshape(-1, 4), labels, np.ones(len(labels)), (width, height), "human", "yolo", mask_arr)
            name = image_path.relative_to(base).as_posix() if image_path.is_relative_to(base) else image_path.name
            images.append(TruthImage(name, truth, image_path))
    if not images:
        raise TruthError(f"no images under {', '.join(map(str, image_dirs))}")
    return TruthSet(images, classes, "yolo", str(yaml_path))


def _labels_in_export(tasks: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for task in tasks:
        for ann in task.get("annotations") or []:
            for region in ann.get("result") or []:
                value = region.get("value") or {}
                for key in ("rectanglelabels", "polygonlabels", "brushlabels"):
                    for label in value.get(key) or []:
                        seen.setdefault(str(label))
    return list(seen)


def _ls_region_mask(region: dict, width: int, height: int) -> np.ndarray | None:
    value = region.get("value") or {}
    kind = str(region.get("type", "")).lower()
    if kind == "brushlabels" and value.get("rle"):
        return geometry.ls_brush_to_mask(value["rle"], width, height)
    if kind == "polygonlabels" and len(value.get("points") or []) >= 3:
        return geometry.polygon_to_mask(geometry.ls_points_to_pixels(value["points"], width, height), width, height)
    return None


def load_label_studio(path: Path, tasks: list[dict], *, label_config: str | None = None,
                      document_root: Path | str | None = None, images_root: Path | str | None = None) -> TruthSet:
    """A Label Studio JSON export: the latest non-skipped annotation of each task is the truth."""
    from backend.cli.common import config_from_labels
    from backend.label_config import ProjectConfig
    from worker.annotations import parse_task
    from worker.dataset import parse_regions

    notes: list[str] = []
    xml = label_config or config_from_labels(_labels_in_export(tasks) or ["object"])
    config = ProjectConfig.parse(xml)
    images = []
    for raw in tasks:
        task = parse_task(raw)
        if task is None:
            continue
        url = task.data.get(config.image_key)
        if not isinstance(url, str):
            notes.append(f"task {task.id}: no {config.image_key!r} in data")
            continue
        size = None
        for region in task.result:
            w, h = region.get("original_width"), region.get("original_height")
            if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
                size = (int(w), int(h))
                break
        boxes, labels, masks = [], [], []
        for region in task.result:
            parsed = parse_regions([region], config, size, dedupe=False)
            if not len(parsed):
                continue
            boxes.append(parsed.xyxy[0])
            labels.append(parsed.labels[0])
            masks.append(_ls_region_mask(region, *size) if size else None)
        mask_arr = np.stack(masks) if masks and all(m is not None for m in masks) else None
        truth = Detections(np.array(boxes, dtype=float).reshape(-1, 4), labels, np.ones(len(labels)), size or (0, 0), "human",
                           f"label-studio:{task.annotation_id}", mask_arr)
        local, name = _ls_local_path(url, document_root, images_root)
        images.append(TruthImage(name, truth, local, None if local else url))
    return TruthSet(images, config.class_names, "label-studio", str(path), xml, notes)


def _ls_local_path(url: str, document_root, images_root) -> tuple[Path | None, str]:
    """``/data/local-files/?d=rel`` under ``document_root``; other URLs by basename under ``images_root``."""
    parts = urlsplit(url)
    if parts.path.rstrip("/").endswith("/data/local-files"):
        rel = unquote(parse_qs(parts.query).get("d", [""])[0])
        if document_root and rel:
            candidate = Path(document_root) / rel
            return (candidate if candidate.is_file() else None), rel
        return None, rel
    name = Path(unquote(parts.path)).name or url
    if images_root:
        candidate = Path(images_root) / name
        if candidate.is_file():
            return candidate, name
    if not parts.scheme and Path(url).is_file():
        return Path(url), name
    return None, name


# --- metrics ------------------------------------------------------------------------------------

def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _none_if_negative(value: float) -> float | None:
    return None if value is None or value < 0 else round(float(value), 6)


def coco_eval(pairs: Sequence[tuple[Detections, Detections]], classes: Sequence[str], iou_type: str = "bbox") -> dict:
    """pycocotools COCOeval over the pairs: summary stats, per-class AP and the PR curve at IoU 0.5."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
    empty = {"map50_95": 0.0, "map50": 0.0, "map75": 0.0, **{f"map_{s}": None for s in SIZES},
             "ar1": 0.0, "ar10": 0.0, "ar100": 0.0, **{f"ar_{s}": None for s in SIZES}, "per_class": {}, "pr_curve": None}
    if not gts:
        return {**empty, "note": "no ground-truth objects"}
    if not dts:
        return {**empty, "note": "no predictions"}
    gt_api = COCO()
    gt_api.dataset = {"images": images, "annotations": gts, "categories": [{"id": i, "name": n} for n, i in cid.items()]}
    _quiet(gt_api.createIndex)
    dt_api = _quiet(gt_api.loadRes, dts)
    evaluator = COCOeval(gt_api, dt_api, iou_type)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    s = evaluator.stats
    precision = evaluator.eval["precision"]  # [T iou, R 101 recall points, K classes, A areas, M maxDets]
    per_class = {}
    for name, k in cid.items():
        p_all = precision[:, :, k - 1, 0, -1]
        p_50 = precision[0, :, k - 1, 0, -1]
        per_class[name] = {"ap50_95": round(float(p_all[p_all > -1].mean()), 6) if (p_all > -1).any() else None,
                           "ap50": round(float(p_50[p_50 > -1].mean()), 6) if (p_50 > -1).any() else None}
    curve = precision[0, :, :, 0, -1]
    valid = curve > -1
    pr = None
    if valid.any():
        mean = np.where(valid.any(axis=1), np.where(valid, curve, 0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan)
        pr = {"recall": [round(float(r), 2) for r in evaluator.params.recThrs],
              "precision": [None if np.isnan(v) else round(float(v), 6) for v in mean]}
    return {
        "map50_95": _none_if_negative(s[0]) or 0.0, "map50": _none_if_negative(s[1]) or 0.0, "map75": _none_if_negative(s[2]) or 0.0,
        "map_small": _none_if_negative(s[3]), "map_medium": _none_if_negative(s[4]), "map_large": _none_if_negative(s[5]),
        "ar1": _none_if_negative(s[6]), "ar10": _none_if_negative(s[7]), "ar100": _none_if_negative(s[8]),
        "ar_small": _none_if_negative(s[9]), "ar_medium": _none_if_negative(s[10]), "ar_large": _none_if_negative(s[11]),
        "per_class": per_class, "pr_curve": pr,
    }


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
             score_threshold: float = 0.0) -> dict:
    """Every metric of the module docstring; JSON-safe."""
    from worker.evaluate import evaluate_detections

    pairs = [(p, g if g.image_size != (0, 0) else replace(g, image_size=p.image_size)) for p, g in pairs]
    classes = list(classes)
    coco = coco_eval(pairs, classes, "bbox")
    gate = evaluate_detections(pairs, classes=classes, score_threshold=score_threshold)

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
    n_pred_by_class = {c: 0 for c in classes}
    n_gt_by_class = {c: 0 for c in classes}
    for pred, gt in pairs:
        for label in pred.labels:
            if label in n_pred_by_class:
                n_pred_by_class[label] += 1
        for label in gt.labels:
            if label in n_gt_by_class:
                n_gt_by_class[label] += 1

    per_class = {}
    for c in classes:
        gate_c = gate.per_class.get(c, {})
        per_class[c] = {
            "ap50": coco["per_class"].get(c, {}).get("ap50"), "ap50_95": coco["per_class"].get(c, {}).get("ap50_95"),
            "n_gt": n_gt_by_class[c], "n_pred": n_pred_by_class[c], "gate_ap50": gate_c.get("ap50"),
        }
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
        segm = coco_eval(pairs, classes, "segm")
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


# --- report -------------------------------------------------------------------------------------

def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_all(metrics: dict, folder: Path) -> dict[str, str]:
    """PNG plots into ``folder``; returns {name: file name}."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    fig = _figure()
    ax = fig.add_subplot(111)
    bins = metrics["iou"]["bins"]
    ax.bar(bins[:-1], metrics["iou"]["counts"], width=np.diff(bins), align="edge", color="#4c72b0", edgecolor="white")
    ax.axvline(0.5, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_xlabel("IoU of the best same-label prediction, per true box (0 = missed)")
    ax.set_ylabel("true boxes")
    ax.set_title("IoU histogram")
    fig.tight_layout()
    fig.savefig(folder / "iou_histogram.png")
    files["iou_histogram"] = "iou_histogram.png"

    pr = metrics.get("pr_curve")
    if pr:
        fig = _figure()
        ax = fig.add_subplot(111)
        recall = [r for r, p in zip(pr["recall"], pr["precision"]) if p is not None]
        precision = [p for p in pr["precision"] if p is not None]
        ax.plot(recall, precision, color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"Precision-recall at IoU 0.5 (mAP50 {metrics['coco']['map50']:.3f})")
        fig.tight_layout()
        fig.savefig(folder / "pr_curve.png")
        files["pr_curve"] = "pr_curve.png"

    per_class = metrics.get("per_class") or {}
    if per_class:
        names = list(per_class)
        fig = _figure(max(6.0, 0.6 * len(names) + 2), 3.6)
        ax = fig.add_subplot(111)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [per_class[n]["ap50"] or 0 for n in names], 0.4, label="AP50", color="#4c72b0")
        ax.bar(x + 0.2, [per_class[n]["ap50_95"] or 0 for n in names], 0.4, label="AP50-95", color="#55a868")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title("AP per class")
        fig.tight_layout()
        fig.savefig(folder / "per_class_ap.png")
        files["per_class_ap"] = "per_class_ap.png"

    sizes = metrics["sizes"]
    fig = _figure()
    ax = fig.add_subplot(111)
    x = np.arange(len(SIZES))
    ax.bar(x - 0.2, [sizes[s]["recall50"] or 0 for s in SIZES], 0.4, label="recall@0.5", color="#4c72b0")
    ax.bar(x + 0.2, [sizes[s]["map50_95"] or 0 for s in SIZES], 0.4, label="mAP50-95", color="#55a868")
    ax.set_xticks(x, [f"{s}\n(n={sizes[s]['n_gt']})" for s in SIZES])
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("By object size (small < 32², medium < 96² px)")
    fig.tight_layout()
    fig.savefig(folder / "sizes.png")
    files["sizes"] = "sizes.png"

    speed = metrics.get("speed") or {}
    if speed.get("latencies_s"):
        fig = _figure()
        ax = fig.add_subplot(111)
        ax.hist(speed["latencies_s"], bins=min(30, max(5, len(speed["latencies_s"]) // 2)), color="#8172b2")
        ax.set_xlabel("seconds per image (detector call)")
        ax.set_ylabel("images")
        ax.set_title("Latency")
        fig.tight_layout()
        fig.savefig(folder / "latency.png")
        files["latency"] = "latency.png"
    return files


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(metrics: dict, folder: Path | str, *, title: str = "Draft quality", about: dict | None = None) -> Path:
    """``report.md``, ``metrics.json`` and ``plots/*.png`` in ``folder``; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_all(metrics, folder / "plots")
    (folder / "metrics.json").write_text(json.dumps({"about": about or {}, **metrics}, indent=1, default=str))
    c, g = metrics["coco"], metrics["gate"]
    lines = [f"# {title}", ""]
    for key, value in (about or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", f"{metrics['n_images']} images, {metrics['n_gt']} true objects, {metrics['n_pred']} predictions"
              + (f" ({metrics['n_pred_unknown_label']} with labels outside the class list, ignored)" if metrics["n_pred_unknown_label"] else "")
              + ".", ""]
    lines += ["## Boxes", "", "| metric | value |", "|---|---|",
              f"| mAP50-95 (pycocotools) | {_fmt(c['map50_95'])} |", f"| mAP50 | {_fmt(c['map50'])} |", f"| mAP75 | {_fmt(c['map75'])} |",
              f"| AR@100 | {_fmt(c.get('ar100'))} |",
              f"| precision @ score ≥ {g['score_threshold']:g}, IoU 0.5 | {_fmt(g['precision'])} |",
              f"| recall @ score ≥ {g['score_threshold']:g}, IoU 0.5 | {_fmt(g['recall'])} |",
              f"| mAP50 / mAP50-95 (training gate's implementation) | {_fmt(g['map50'])} / {_fmt(g['map50_95'])} |",
              f"| mean best IoU per true box | {_fmt(metrics['iou']['mean'])} |", ""]
    if c.get("note"):
        lines += [f"Note: {c['note']}.", ""]
    lines += ["### By class", "", "| class | true | predicted | AP50 | AP50-95 |", "|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['n_gt']} | {row['n_pred']} | {_fmt(row['ap50'])} | {_fmt(row['ap50_95'])} |")
    lines += ["", "### By object size", "", "| size | true | recall@0.5 | mean IoU | mAP50-95 |", "|---|---|---|---|---|"]
    for s in SIZES:
        row = metrics["sizes"][s]
        lines.append(f"| {s} | {row['n_gt']} | {_fmt(row['recall50'])} | {_fmt(row['mean_iou'])} | {_fmt(row['map50_95'])} |")
    lines.append("")
    for key, caption in (("iou_histogram", "IoU histogram"), ("pr_curve", "Precision-recall"), ("per_class_ap", "AP per class"), ("sizes", "By size")):
        if key in plots:
            lines.append(f"![{caption}](plots/{plots[key]})")
    lines.append("")
    m = metrics.get("masks")
    if m:
        lines += ["## Masks", "", "| metric | value |", "|---|---|",
                  f"| segm mAP50-95 (pycocotools) | {_fmt(m['segm_map50_95'])} |", f"| segm mAP50 | {_fmt(m['segm_map50'])} |",
                  f"| instance mIoU (true objects matched at box IoU ≥ 0.5, n={m['n_matched']}) | {_fmt(m['instance_miou'])} |",
                  f"| instance Dice | {_fmt(m['instance_dice'])} |",
                  f"| semantic mIoU (per class, all pixels) | {_fmt(m['semantic_miou'])} |",
                  f"| semantic Dice | {_fmt(m['semantic_dice'])} |", ""]
    sp = metrics.get("speed")
    if sp:
        lines += ["## Speed", "", "| metric | value |", "|---|---|",
                  f"| images per second (wall) | {_fmt(sp['images_per_second'])} |",
                  (f"| latency mean / p50 / p90 / p95 / max (s) | {_fmt(sp['latency_mean_s'])} / {_fmt(sp['latency_p50_s'])} / "
                   f"{_fmt(sp['latency_p90_s'])} / {_fmt(sp['latency_p95_s'])} / {_fmt(sp['latency_max_s'])} |"),
                  f"| wall time (s) | {_fmt(sp['wall_s'])} |", ""]
        if "latency" in plots:
            lines += [f"![Latency](plots/{plots['latency']})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    return report
