"""Build a YOLO detection dataset from a project's annotated tasks.

Layout (under ``DATA_DIR/datasets/<project>/<dataset hash>/``, built in a hidden staging folder
and renamed into place)::

    images/{train,val}/<task id>.jpg    decoded (EXIF-transposed) images, long side capped
    labels/{train,val}/<task id>.txt    ``class cx cy w h`` (normalised), empty for negatives
    data.yaml                           absolute ``path:``, ``names`` in label-config order, no ``download:``
    manifest.json                       counts, split, per-item ground truth (for evaluation)

Rules: classes are ``ProjectConfig.class_names`` (label-config order). Regions become boxes through
their control models (:func:`backend.control_models.parse_regions`: a rotated rectangle becomes its
axis-aligned bounds, polygons and brushes their bounding boxes; a region with an unknown label, a
(near) zero-area box or a duplicate of a box of the same class is skipped). A task whose image
cannot be loaded is skipped; every skip is counted by reason. Tasks without boxes are kept as
negatives. The split is a deterministic function of the task id (see :func:`split_tasks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backend.control_models.reader import parse_regions
from backend.core.detections import Detections
from backend.core.geometry import scaled_size, xyxy_to_yolo, yolo_to_xyxy
from backend.core.images import ImageLoader
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask

log = logging.getLogger(__name__)

KEEP_DATASETS = 2  # dataset folders kept per project


class ImageSource(Protocol):
    """What :class:`backend.core.images.ImageLoader` offers (tests may inject another)."""

    def load(self, url: str, task_id: int | None = None) -> Any: ...


class NotEnoughData(ValueError):
    """Fewer usable tasks than a train/val split needs."""


# --- split -------------------------------------------------------------------------------------

def task_fraction(project: str, task_id: int) -> float:
    """A stable pseudo-random number in [0, 1) for a task: its place in the split."""
    digest = hashlib.sha256(f"lsb-split:{project}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_tasks(project: str, task_ids: Sequence[int], val_fraction: float, val_min: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) split by a hash of each task id.

    A task is in val when its hash fraction is below ``val_fraction``, so membership does not move
    as the project grows; if that gives fewer than ``max(val_min, ceil(fraction * n))`` tasks, the
    lowest-hash remaining tasks are added. Train is never empty (needs at least 2 tasks).
    """
    ids = sorted({int(t) for t in task_ids})
    if len(ids) < 2:
        raise NotEnoughData(f"{len(ids)} usable annotated task(s); at least 2 are needed for a train/val split")
    ranked = sorted(ids, key=lambda t: (task_fraction(project, t), t))
    val = [t for t in ranked if task_fraction(project, t) < val_fraction]
    want = max(val_min, math.ceil(val_fraction * len(ids)))
    for t in ranked:
        if len(val) >= want:
            break
        if t not in val:
            val.append(t)
    val = val[: len(ids) - 1] if len(val) >= len(ids) else val
    val_set = set(val)
    return [t for t in ids if t not in val_set], sorted(val_set)


def dataset_hash(tasks: Iterable[AnnotatedTask], classes: Sequence[str]) -> str:
    payload = {"classes": list(classes), "tasks": sorted(t.fingerprint for t in tasks)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --- result ------------------------------------------------------------------------------------

@dataclass
class DatasetItem:
    task_id: int
    split: str
    image_path: Path
    width: int  # saved image
    height: int
    orig_width: int  # as Label Studio shows it (EXIF-transposed)
    orig_height: int
    labels: list[str]
    boxes: np.ndarray  # original pixels xyxy

    def ground_truth(self, saved: bool = True) -> Detections:
        """Ground truth as Detections, in the saved image's pixels (model eval) or the original's."""
        if not saved:
            return Detections(self.boxes, list(self.labels), np.ones(len(self.labels)), (self.orig_width, self.orig_height),
                              "human")
        boxes = [yolo_to_xyxy(xyxy_to_yolo(b, self.orig_width, self.orig_height), self.width, self.height) for b in self.boxes]
        return Detections(np.array(boxes).reshape(-1, 4), list(self.labels), np.ones(len(self.labels)), (self.width, self.height),
                          "human")

    def to_json(self) -> dict:
        return {
            "task_id": self.task_id, "split": self.split, "image": self.image_path.name,
            "width": self.width, "height": self.height, "orig_width": self.orig_width, "orig_height": self.orig_height,
            "labels": self.labels, "boxes": np.round(self.boxes, 3).tolist(),
        }


@dataclass
class DatasetResult:
    project: str
    root: Path
    data_yaml: Path
    classes: list[str]
    dataset_hash: str
    items: list[DatasetItem]
    counts: dict[str, Any]
    duration_s: float = 0.0

    @property
    def train_ids(self) -> list[int]:
        return [i.task_id for i in self.items if i.split == "train"]

    @property
    def val_ids(self) -> list[int]:
        return [i.task_id for i in self.items if i.split == "val"]

    @property
    def val_items(self) -> list[DatasetItem]:
        return [i for i in self.items if i.split == "val"]

    def to_meta(self) -> dict:
        return {
            "dataset_hash": self.dataset_hash,
            "classes": self.classes,
            "counts": self.counts,
            "val_task_ids": self.val_ids,
            "root": str(self.root),
        }


# --- building ----------------------------------------------------------------------------------

def _default_loader(settings):
    return ImageLoader(settings)


def _load_one(loader: ImageSource, task: AnnotatedTask, image_key: str):
    url = task.data.get(image_key)
    if not isinstance(url, str) or not url:
        return task, None, "no_image", f"task data has no {image_key!r}"
    try:
        return task, loader.load(url, task.id), None, ""
    except Exception as exc:  # noqa: BLE001 - ImageError(reason, message) from backend.core.images, anything else
        reason = getattr(exc, "reason", None) or "load_error"
        return task, None, str(reason), str(getattr(exc, "message", exc))


def build_dataset(
    project: str,
    tasks: Sequence[AnnotatedTask],
    config: ProjectConfig,
    settings,
    loader: ImageSource | None = None,
    out_dir: Path | None = None,
    max_image_side: int | None = None,
    threads: int = 4,
) -> DatasetResult:
    """Download, convert and split; returns a :class:`DatasetResult`. Raises :class:`NotEnoughData`."""
    started = time.monotonic()
    classes = config.class_names
    index = {name: i for i, name in enumerate(classes)}
    max_side = max_image_side or max(2 * int(settings.train_imgsz), 640)
    dhash = dataset_hash(tasks, classes)
    base = Path(out_dir or Path(settings.data_dir) / "datasets" / str(project)).resolve()
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
    own_loader = loader is None
    loader = loader or _default_loader(settings)
    skipped_tasks: Counter = Counter()
    skipped_regions: Counter = Counter()
    converted: Counter = Counter()
    errors: list[str] = []
    loaded: list[tuple[AnnotatedTask, Any]] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for task, image, reason, message in pool.map(lambda t: _load_one(loader, t, config.image_key), tasks):
                if image is None:
                    skipped_tasks[reason] += 1
                    if len(errors) < 20:
                        errors.append(f"task {task.id}: {reason}: {message}")
                    continue
                loaded.append((task, image))
        _, val_ids = split_tasks(str(project), [t.id for t, _ in loaded], settings.train_val_fraction, settings.train_val_min)
        val_set = set(val_ids)
        items: list[DatasetItem] = []
        per_class: Counter = Counter()
        for sub in ("images/train", "images/val", "labels/train", "labels/val"):
            (staging / sub).mkdir(parents=True, exist_ok=True)
        for task, img in loaded:
            split = "val" if task.id in val_set else "train"
            width, height = int(img.width), int(img.height)
            boxes = parse_regions(task.result, config, (width, height))
            skipped_regions.update(boxes.skipped)
            converted.update(boxes.converted)
            pil = img.image
            sw, sh = scaled_size(width, height, max_side)
            if (sw, sh) != (width, height):
                pil = pil.resize((sw, sh))
            image_path = staging / "images" / split / f"{task.id}.jpg"
            pil.convert("RGB").save(image_path, "JPEG", quality=95)
            lines = []
            for box, label in zip(boxes.xyxy, boxes.labels):
                cx, cy, w, h = np.clip(xyxy_to_yolo(box, width, height), 0.0, 1.0)
                lines.append(f"{index[label]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
                per_class[label] += 1
            (staging / "labels" / split / f"{task.id}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            items.append(DatasetItem(task.id, split, image_path, sw, sh, width, height, list(boxes.labels), boxes.xyxy))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if own_loader and hasattr(loader, "close"):
            loader.close()

    target = base / dhash
    counts = {
        "tasks": len(tasks),
        "images": len(items),
        "train": sum(1 for i in items if i.split == "train"),
        "val": sum(1 for i in items if i.split == "val"),
        "negatives": sum(1 for i in items if not i.labels),
        "boxes": int(sum(per_class.values())),
        "per_class": {c: int(per_class.get(c, 0)) for c in classes},
        "skipped_tasks": dict(skipped_tasks),
        "skipped_regions": dict(skipped_regions),
        "converted_regions": dict(converted),
        "errors": errors,
    }
    data_yaml = target / "data.yaml"
    # JSON is valid YAML: no quoting surprises with odd class names.
    yaml_text = json.dumps({"path": str(target), "train": "images/train", "val": "images/val",
                            "names": list(classes), "nc": len(classes)}, indent=1)
    (staging / "data.yaml").write_text(yaml_text + "\n")
    manifest = {"project": str(project), "dataset_hash": dhash, "classes": classes, "counts": counts,
                "items": [i.to_json() for i in items], "created_at": time.time()}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    for item in items:
        item.image_path = target / "images" / item.split / item.image_path.name
    _prune_datasets(base, keep=KEEP_DATASETS, protect=target)
    result = DatasetResult(str(project), target, data_yaml, classes, dhash, items, counts, time.monotonic() - started)
    log.info("dataset %s for project %s: %s", dhash, project, {k: v for k, v in counts.items() if k != "errors"})
    return result


def _prune_datasets(base: Path, keep: int, protect: Path) -> None:
    dirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(key=lambda p: p.stat().st_mtime)
    for old in dirs[:-keep] if keep > 0 else dirs:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in base.glob(".staging-*"):  # left by a killed build
        if time.time() - stale.stat().st_mtime > 6 * 3600:
            shutil.rmtree(stale, ignore_errors=True)


def load_dataset(root: Path | str) -> DatasetResult:
    """Re-open a built dataset from its manifest (for the eval CLI)."""
    root = Path(root).resolve()
    manifest = json.loads((root / "manifest.json").read_text())
    items = [
        DatasetItem(d["task_id"], d["split"], root / "images" / d["split"] / d["image"], d["width"], d["height"],
                    d["orig_width"], d["orig_height"], list(d["labels"]), np.array(d["boxes"], dtype=float).reshape(-1, 4))
        for d in manifest["items"]
    ]
    return DatasetResult(manifest["project"], root, root / "data.yaml", manifest["classes"], manifest["dataset_hash"], items,
                         manifest["counts"])
