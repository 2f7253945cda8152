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
negatives. The split is a deterministic function of the task id (see :func:`split_tasks`). Drafts of
unannotated tasks (:mod:`worker.training.drafts`) join the training split only, capped, and never
replace a human label; each item's ``source`` says which it is.

Memory does not grow with the number of tasks: each image is converted and written as soon as it is
loaded, at most ``threads`` decoded at a time (:mod:`worker.training.staging`), and moved into its
split folder once every load is done.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.core.detections import Detections
from backend.core.geometry import xyxy_to_yolo, yolo_to_xyxy
from backend.core.images import ImageLoader
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask
from worker.training.drafts import DraftLabels, DraftSelection, draft_cap, stage_drafts
from worker.training.staging import ImageSource, StagedImage, StagingPlan, stage_images, staged_image_path, staged_label_path

log = logging.getLogger(__name__)

KEEP_DATASETS = 2  # dataset folders kept per project


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


def dataset_hash(tasks: Iterable[AnnotatedTask], classes: Sequence[str], drafts: DraftSelection | None = None,
                 draft_max_share: float = 0.0) -> str:
    """What the dataset is built from: classes, human labels and, when any, the drafts and their rules."""
    payload: dict[str, Any] = {"classes": list(classes), "tasks": sorted(t.fingerprint for t in tasks)}
    if drafts is not None and drafts.drafts:  # without drafts the hash is the one human labels always gave
        payload["drafts"] = {"labels": drafts.fingerprints(), "min_score": drafts.min_score, "max_share": draft_max_share}
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
    source: str = "human"  # "draft": a stored prediction of an unannotated task (training split only)

    def ground_truth(self, saved: bool = True) -> Detections:
        """Ground truth as Detections, in the saved image's pixels (model eval) or the original's."""
        if not saved:
            return Detections(self.boxes, list(self.labels), np.ones(len(self.labels)), (self.orig_width, self.orig_height),
                              self.source)
        boxes = [yolo_to_xyxy(xyxy_to_yolo(b, self.orig_width, self.orig_height), self.width, self.height) for b in self.boxes]
        return Detections(np.array(boxes).reshape(-1, 4), list(self.labels), np.ones(len(self.labels)), (self.width, self.height),
                          self.source)

    def to_json(self) -> dict:
        return {
            "task_id": self.task_id, "split": self.split, "image": self.image_path.name,
            "width": self.width, "height": self.height, "orig_width": self.orig_width, "orig_height": self.orig_height,
            "labels": self.labels, "boxes": np.round(self.boxes, 3).tolist(), "source": self.source,
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
        """The held-out items: human-annotated only (drafts never enter the val split)."""
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


def build_dataset(
    project: str,
    tasks: Sequence[AnnotatedTask],
    config: ProjectConfig,
    settings,
    loader: ImageSource | None = None,
    out_dir: Path | None = None,
    max_image_side: int | None = None,
    threads: int = 4,
    drafts: DraftSelection | None = None,
) -> DatasetResult:
    """Download, convert and split; returns a :class:`DatasetResult`. Raises :class:`NotEnoughData`.

    ``drafts`` (:mod:`worker.training.drafts`) add training examples from unannotated tasks: never for a
    task of ``tasks``, never in the val split, at most ``TRAIN_DRAFT_MAX_SHARE`` of the training images.

    Each image is written as soon as it is loaded (:mod:`worker.training.staging`: at most ``threads``
    decoded at a time) into ``staging/pending/``; once every load is done the split is known and the
    files are renamed into ``images/{train,val}`` and ``labels/{train,val}``.
    """
    started = time.monotonic()
    classes = config.class_names
    index = {name: i for i, name in enumerate(classes)}
    max_side = max_image_side or max(2 * int(settings.train_imgsz), 640)
    max_share = float(settings.train_draft_max_share)
    human_ids = {t.id for t in tasks}
    usable = [d for d in drafts.drafts if d.task.id not in human_ids] if drafts is not None else []
    dhash = dataset_hash(tasks, classes, drafts, max_share)
    base = Path(out_dir or Path(settings.data_dir) / "datasets" / str(project)).resolve()
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
    pending = staging / "pending"
    own_loader = loader is None
    loader = loader or _default_loader(settings)
    skipped_tasks: Counter = Counter()
    skipped_regions: Counter = Counter()
    converted: Counter = Counter()
    errors: list[str] = []
    try:
        pending.mkdir()
        plan = StagingPlan(loader, config, index, max_side, pending, threads)
        staged = stage_images(tasks, plan)
        written = [s for s in staged if s.ok]
        for failed in (s for s in staged if not s.ok):
            skipped_tasks[failed.reason] += 1
            if len(errors) < 20:
                errors.append(f"task {failed.task_id}: {failed.reason}: {failed.message}")
        _, val_ids = split_tasks(str(project), [s.task_id for s in written], settings.train_val_fraction,
                                 settings.train_val_min)
        val_set = set(val_ids)
        cap = draft_cap(len(written) - len(val_set), max_share)
        ranked = sorted(usable, key=lambda d: (task_fraction(str(project), d.task.id), d.task.id))
        draft_written, draft_skipped = stage_drafts(ranked, cap, plan)
        draft_ids = {s.task_id for s in draft_written}
        items: list[DatasetItem] = []
        per_class: Counter = Counter()
        for sub in ("images/train", "images/val", "labels/train", "labels/val"):
            (staging / sub).mkdir(parents=True, exist_ok=True)
        for s in [*written, *sorted(draft_written, key=lambda r: r.task_id)]:
            source = "draft" if s.task_id in draft_ids else "human"
            split = "val" if source == "human" and s.task_id in val_set else "train"  # a draft never in val
            skipped_regions.update(s.skipped_regions)
            converted.update(s.converted_regions)
            per_class.update(s.labels)
            image_path = staging / "images" / split / f"{s.task_id}.jpg"
            os.replace(staged_image_path(pending, s.task_id), image_path)
            os.replace(staged_label_path(pending, s.task_id), staging / "labels" / split / f"{s.task_id}.txt")
            items.append(DatasetItem(s.task_id, split, image_path, s.saved_width, s.saved_height, s.width, s.height,
                                     list(s.labels), s.boxes, source))
        shutil.rmtree(pending)
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
        "human_tasks": len(written),
        "draft_tasks": len(draft_written),
    }
    counts["drafts"] = _draft_counts(drafts, usable, cap, max_share, draft_written, draft_skipped, counts["train"])
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
    log.info("dataset %s for project %s: %s", dhash, project, {k: v for k, v in counts.items() if k not in ("errors", "drafts")})
    if drafts is not None:
        log.info("project %s: %d human-annotated and %d draft tasks (drafts %s)", project, counts["human_tasks"],
                 counts["draft_tasks"], counts["drafts"])
    return result


def _draft_counts(selection: DraftSelection | None, usable: Sequence[DraftLabels], cap: int, max_share: float,
                  written: Sequence[StagedImage], skipped: Sequence[StagedImage], train_images: int) -> dict[str, Any]:
    """What became of the drafts (logged, and kept in the manifest and the training result)."""
    if selection is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "listed": selection.listed,  # unannotated tasks holding stored predictions
        "annotated": len(selection.drafts) - len(usable),  # annotated meanwhile: the human label won
        "usable": len(usable),
        "cap": cap,
        "used": len(written),
        "over_cap": len(usable) - len(written) - len(skipped),  # never loaded
        "share_of_train": round(len(written) / train_images, 4) if train_images else 0.0,
        "max_share": max_share,
        "min_score": selection.min_score,
        "low_score_regions": selection.low_score_regions,
        "preferred_version": selection.preferred_version,
        "skipped": dict(selection.skipped),  # before loading: no prediction, no region at or above min_score
        "skipped_tasks": dict(Counter(str(r.reason) for r in skipped)),  # while loading
    }


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
                    d["orig_width"], d["orig_height"], list(d["labels"]), np.array(d["boxes"], dtype=float).reshape(-1, 4),
                    d.get("source", "human"))
        for d in manifest["items"]
    ]
    return DatasetResult(manifest["project"], root, root / "data.yaml", manifest["classes"], manifest["dataset_hash"], items,
                         manifest["counts"])
