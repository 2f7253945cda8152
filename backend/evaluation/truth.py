"""Ground truth for evaluation: a COCO json, a YOLO dataset folder or a Label Studio export.

A YOLO folder is ``data.yaml`` + ``images/`` + ``labels/`` (boxes or segmentation polygons); a Label
Studio export is a JSON list of tasks, the latest non-skipped annotation of each being the truth.
Every reader yields a :class:`TruthSet` of :class:`~backend.core.detections.Detections`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import yaml
from PIL import Image, ImageOps

from backend.control_models.reader import labels_in_regions, parse_regions, region_width_height
from backend.core import geometry
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig, config_from_labels
from backend.core.label_studio import parse_task

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class TruthError(ValueError):
    """The ground truth file/folder cannot be read; the message says why."""


# --- ground truth -------------------------------------------------------------------------------

@dataclass
class TruthImage:
    """One image's human labels. ``truth.image_size`` is (0, 0) until known (LS tasks without regions).

    ``task_id`` and ``project`` are the Label Studio task's (exports only), so a report can link to the task."""

    name: str
    truth: Detections
    path: Path | None = None
    url: str | None = None
    task_id: int | None = None
    project: int | None = None


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
        truth = Detections(xyxy, [cats[int(a["category_id"])] for a in rows], np.ones(len(rows)), (width, height), "human",
                           "coco", masks)
        images.append(TruthImage(file_name, truth, local if local.is_file() else None,
                                 file_name if urlsplit(file_name).scheme in ("http", "https", "gs", "s3") else None))
    return TruthSet(images, ordered, "coco", str(path))


def read_data_yaml(path: Path) -> tuple[dict, list[str]]:
    """A YOLO data.yaml (JSON is YAML too) and its class names in index order."""
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

    images = []
    for folder in image_dirs:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for image_path in files:
            parts = list(image_path.parts)
            idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
            label_path = (Path(*parts[:idx], "labels", *parts[idx + 1:]) if idx is not None else image_path).with_suffix(".txt")
            with Image.open(image_path) as im:
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
            truth = Detections(np.array(boxes, dtype=float).reshape(-1, 4), labels, np.ones(len(labels)), (width, height),
                               "human", "yolo", mask_arr)
            name = image_path.relative_to(base).as_posix() if image_path.is_relative_to(base) else image_path.name
            images.append(TruthImage(name, truth, image_path))
    if not images:
        raise TruthError(f"no images under {', '.join(map(str, image_dirs))}")
    return TruthSet(images, classes, "yolo", str(yaml_path))


def load_label_studio(path: Path, tasks: list[dict], *, label_config: str | None = None,
                      document_root: Path | str | None = None, images_root: Path | str | None = None) -> TruthSet:
    """A Label Studio JSON export: the latest non-skipped annotation of each task is the truth."""
    notes: list[str] = []
    annotated = (region for task in tasks for ann in task.get("annotations") or [] for region in ann.get("result") or [])
    xml = label_config or config_from_labels(labels_in_regions(annotated) or ["object"])
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
        size = next((wh for region in task.result if (wh := region_width_height(region, None))), None)
        parsed = parse_regions(task.result, config, size, dedupe=False, with_masks=True)
        truth = Detections(parsed.xyxy, parsed.labels, np.ones(len(parsed)), size or (0, 0), "human",
                           f"label-studio:{task.annotation_id}", parsed.stacked_masks())
        local, name = _ls_local_path(url, document_root, images_root)
        images.append(TruthImage(name, truth, local, None if local else url, task.id, _project_of(raw)))
    return TruthSet(images, config.class_names, "label-studio", str(path), xml, notes)


def _project_of(raw: dict) -> int | None:
    """The task's project id: a JSON export carries it on the task and on each annotation
    (docs/evaluation.md#label-studio-exports)."""
    value = raw.get("project")
    if value is None:
        value = next((a.get("project") for a in raw.get("annotations") or [] if isinstance(a, dict) and a.get("project")), None)
    if isinstance(value, dict):  # an expanded project
        value = value.get("id")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


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
