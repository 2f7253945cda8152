"""Label Studio result lists (an annotation's or a prediction's) -> pixel boxes, labels and masks.

The region format of each type is read by its control model (:data:`BY_RESULT_TYPE`); this module
only walks the list, maps labels to the config's classes, and counts what it skips and why.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from backend.control_models.tags import BY_RESULT_TYPE
from backend.core.detections import Detections
from backend.core.geometry import box_iou
from backend.core.label_config import ProjectConfig

log = logging.getLogger(__name__)

DUPLICATE_IOU = 0.9  # a box over another of the same class by more than this is a duplicate
MIN_BOX_PIXELS = 1.0  # a box thinner than this (in original pixels) counts as zero-area


@dataclass
class ParsedRegions:
    """Regions read from one result list, in pixels of the original image.

    ``masks`` (one per region, None for boxes-only shapes) is filled only when asked for.
    """

    xyxy: np.ndarray
    labels: list[str]
    scores: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)
    masks: list[np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def stacked_masks(self) -> np.ndarray | None:
        """One ``(n, height, width)`` array when every region has a mask, else None."""
        if not self.masks or any(m is None for m in self.masks):
            return None
        return np.stack(self.masks)

    def detections(self, width: int, height: int, source: str, model: str = "") -> Detections:
        return Detections(self.xyxy, list(self.labels), self.scores, (width, height), source, model, self.stacked_masks())


def region_width_height(region: dict, size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The image size to resolve a region's percentages: the loaded image's, else the region's own."""
    if size:
        return size
    w, h = region.get("original_width"), region.get("original_height")
    if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
        return int(w), int(h)
    return None


def region_score(region: dict, default: float | None) -> float | None:
    """A region's confidence: its own ``score``, else ``default`` (the prediction's score, or None)."""
    score = region.get("score")
    return float(score) if isinstance(score, (int, float)) else default


def labels_in_regions(regions: Iterable[dict]) -> list[str]:
    """Every label value the supported regions carry, in first-seen order (a config for an export)."""
    seen: dict[str, None] = {}
    for region in regions:
        value = region.get("value") or {}
        for model in BY_RESULT_TYPE.values():
            for label in model.labels_of(value):
                seen.setdefault(label)
    return list(seen)


def parse_regions(
    result: Sequence[dict],
    config: ProjectConfig,
    size: tuple[int, int] | None,
    source_of: Callable[[dict], str] | None = None,
    dedupe: bool = True,
    default_score: float = 1.0,
    with_masks: bool = False,
) -> ParsedRegions:
    """Boxes of every supported region in ``result`` (an annotation's or a prediction's).

    ``size`` is the image's (width, height) after EXIF transpose; when None the regions'
    ``original_width/height`` are used. ``source_of(region)`` names each region's source (drafts).
    Skips are counted in ``ParsedRegions.skipped``: ``unknown_label``, ``zero_area``, ``duplicate``,
    ``bad_region``, ``other_control`` (regions of controls this backend does not read).
    """
    controls = {c.name: c for c in config.controls}
    class_names = config.class_names
    xyxy: list[np.ndarray] = []
    labels: list[str] = []
    scores: list[float] = []
    sources: list[str] = []
    masks: list[np.ndarray | None] = []
    skipped: Counter = Counter()
    converted: Counter = Counter()
    for region in result or ():
        if not isinstance(region, dict):
            skipped["bad_region"] += 1
            continue
        model = BY_RESULT_TYPE.get(str(region.get("type", "")).lower())
        name = region.get("from_name")
        if model is None or (name is not None and controls and name not in controls):
            skipped["other_control"] += 1
            continue
        value = region.get("value") or {}
        raw_labels = model.labels_of(value)
        label = None
        if raw_labels:
            label = raw_labels[0] if raw_labels[0] in class_names else config.match_label(raw_labels[0])
        if label is None:
            skipped["unknown_label"] += 1
            continue
        wh = region_width_height(region, size)
        if wh is None:
            skipped["bad_region"] += 1
            continue
        width, height = wh
        try:
            box = model.read_box(value, width, height)
            if box is None:
                skipped["zero_area"] += 1
                continue
            mask = model.read_mask(value, width, height) if with_masks else None
            if kind := model.conversion(value):
                converted[kind] += 1
        except (KeyError, TypeError, ValueError) as exc:  # a brush RLE over its image's size among them
            skipped["bad_region"] += 1
            log.warning("skipping a %s region %s: %s", model.tag, str(region.get("id", ""))[:40], str(exc)[:200])
            continue
        box = np.asarray(box, dtype=float)
        if not np.all(np.isfinite(box)) or box[2] - box[0] < MIN_BOX_PIXELS or box[3] - box[1] < MIN_BOX_PIXELS:
            skipped["zero_area"] += 1
            continue
        xyxy.append(box)
        labels.append(label)
        scores.append(region_score(region, default_score))
        sources.append(source_of(region) if source_of else "")
        masks.append(mask)
    boxes = np.array(xyxy, dtype=float).reshape(-1, 4)
    keep = _without_duplicates(boxes, labels, skipped) if dedupe else list(range(len(labels)))
    return ParsedRegions(
        boxes[keep],
        [labels[i] for i in keep],
        np.array([scores[i] for i in keep], dtype=float),
        skipped,
        converted,
        [sources[i] for i in keep],
        [masks[i] for i in keep] if with_masks else None,
    )


def _without_duplicates(boxes: np.ndarray, labels: list[str], skipped: Counter) -> list[int]:
    """Indices kept when a box over an earlier one of the same class (IoU > DUPLICATE_IOU) is dropped."""
    if len(labels) < 2:
        return list(range(len(labels)))
    keep: list[int] = []
    iou = box_iou(boxes, boxes)
    for i in range(len(labels)):
        if any(labels[k] == labels[i] and iou[i, k] > DUPLICATE_IOU for k in keep):
            skipped["duplicate"] += 1
        else:
            keep.append(i)
    return keep
