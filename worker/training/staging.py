"""Fetch, convert and write each task's image as soon as it arrives, a bounded number at a time.

A project of 2,000 photos of 12 MP would need about 80 GB if every decoded image were kept until
the split is known, so nothing decoded outlives its own task: a worker thread loads one image,
reads its regions, writes the downscaled JPEG and the YOLO label file into one flat folder and
returns a small :class:`StagedImage` record; the decoded image is released before the thread takes
the next task. At most ``2 * threads`` tasks are submitted at a time (``threads`` of them running),
so at most ``threads`` decoded images are alive, whatever the number of tasks. The caller moves the
files into ``images/{train,val}`` once the split is known (renames are cheap).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backend.control_models.reader import parse_regions
from backend.core.geometry import scaled_size, xyxy_to_yolo
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask

JPEG_QUALITY = 95
#: Tasks submitted per worker thread: one running and one waiting keeps every thread busy.
TASKS_PER_THREAD = 2


class ImageSource(Protocol):
    """What :class:`backend.core.images.ImageLoader` offers (tests may inject another)."""

    def load(self, url: str, task_id: int | None = None) -> Any: ...


@dataclass
class StagedImage:
    """What is left of one task once its image and labels are on disk (or why it has none)."""

    index: int  # place in the task list: results are put back in that order
    task_id: int
    reason: str | None = None  # why the task was skipped; None when written
    message: str = ""
    width: int = 0  # as Label Studio shows it (EXIF-transposed)
    height: int = 0
    saved_width: int = 0
    saved_height: int = 0
    labels: list[str] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # original pixels xyxy
    skipped_regions: Counter = field(default_factory=Counter)
    converted_regions: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.reason is None


def staged_image_path(folder: Path, task_id: int) -> Path:
    return folder / f"{task_id}.jpg"


def staged_label_path(folder: Path, task_id: int) -> Path:
    return folder / f"{task_id}.txt"


def _write_jpeg(image: Any, path: Path, max_side: int) -> tuple[int, int]:
    """The image, long side capped at ``max_side``, as an RGB JPEG; returns the saved size."""
    width, height = int(image.width), int(image.height)
    saved = scaled_size(width, height, max_side)
    if saved != (width, height):
        image = image.resize(saved)
    image.convert("RGB").save(path, "JPEG", quality=JPEG_QUALITY)
    return saved


@dataclass(frozen=True)
class StagingPlan:
    """Where and how every task of one build is staged."""

    loader: ImageSource
    config: ProjectConfig
    class_index: Mapping[str, int]
    max_side: int
    folder: Path
    threads: int = 4


def stage_one(index: int, task: AnnotatedTask, plan: StagingPlan, needs_boxes: bool = False) -> StagedImage:
    """Load, convert and write one task; a load failure is a skipped task, anything else raises.

    ``needs_boxes`` (drafts): a task whose regions give no box is skipped (``no_regions``) instead of
    becoming a negative, since a draft without boxes says "unsure", not "nothing here".
    """
    config = plan.config
    url = task.data.get(config.image_key)
    if not isinstance(url, str) or not url:
        return StagedImage(index, task.id, "no_image", f"task data has no {config.image_key!r}")
    try:
        loaded = plan.loader.load(url, task.id)
    except Exception as exc:  # noqa: BLE001 - ImageError(reason, message) from backend.core.images, anything else
        reason = getattr(exc, "reason", None) or "load_error"
        return StagedImage(index, task.id, str(reason), str(getattr(exc, "message", exc)))
    width, height = int(loaded.width), int(loaded.height)
    boxes = parse_regions(task.result, config, (width, height))
    if needs_boxes and not len(boxes):
        return StagedImage(index, task.id, "no_regions", "no region of the draft gives a box")
    saved_width, saved_height = _write_jpeg(loaded.image, staged_image_path(plan.folder, task.id), plan.max_side)
    del loaded  # the decoded image goes now, not when the thread's next task replaces it
    lines = []
    for box, label in zip(boxes.xyxy, boxes.labels):
        cx, cy, w, h = np.clip(xyxy_to_yolo(box, width, height), 0.0, 1.0)
        lines.append(f"{plan.class_index[label]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    staged_label_path(plan.folder, task.id).write_text("\n".join(lines) + ("\n" if lines else ""))
    return StagedImage(index, task.id, None, "", width, height, saved_width, saved_height, list(boxes.labels), boxes.xyxy,
                       boxes.skipped, boxes.converted)


def stage_images(tasks: Sequence[AnnotatedTask], plan: StagingPlan, needs_boxes: bool = False) -> list[StagedImage]:
    """Every task through :func:`stage_one` on ``plan.threads`` threads, at most ``TASKS_PER_THREAD`` per
    thread submitted at a time; records in task order. The first unexpected error is raised once the
    running tasks have finished (tasks not started yet are cancelled)."""
    threads = max(1, plan.threads)
    window = TASKS_PER_THREAD * threads
    todo = iter(enumerate(tasks))
    records: list[StagedImage] = []
    pending: set[Future] = set()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dataset") as pool:
        try:
            while True:
                for index, task in todo:
                    pending.add(pool.submit(stage_one, index, task, plan, needs_boxes))
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                records.extend(future.result() for future in done)
        finally:
            for future in pending:
                future.cancel()
    records.sort(key=lambda r: r.index)
    return records
