"""Turn Gemini's answer text into :class:`~backend.core.detections.Detections`, surviving its habits.

Pure functions, no network: the detector calls :func:`parse_answer` on fresh and cached answers
alike. What Gemini does wrong and how it is handled (docs/gemini.md#known-misbehaviour):

- ```json fences around the JSON: stripped.
- Truncated JSON at ``finishReason: MAX_TOKENS``: every complete object before the cut is kept.
- ``{"boxes": [...]}`` (newer structured form) as well as a bare array.
- Swapped corners / values outside 0-1000: ordered and clamped by ``geometry.gemini_to_xyxy``.
- Zero-area boxes, malformed items, labels outside the config: dropped and counted.
- Repetition loops (hundreds of near-identical boxes): class-aware NMS, then the object cap.
- Masks: Gemini 2.5 PNG probability maps over the box, or polygons of ``[x, y]`` points on
  0-1000 over the whole image (Gemini 3.x / Robotics-ER), only when the config wants masks.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from backend.core.detections import Detections
from backend.core.geometry import (
    box_area,
    box_to_mask,
    gemini_mask_to_full,
    gemini_points_to_pixels,
    gemini_to_xyxy,
    nms_keep,
    polygon_to_mask,
)
from backend.core.label_config import ProjectConfig

# Gemini returns no calibrated confidence: its boxes are generated text, not scored proposals.
# A constant mid score keeps them above typical thresholds (0.25) yet marks them as unscored, so
# Label Studio's "sort by score" and active-learning heuristics do not treat them as certain.
DEFAULT_SCORE = 0.5
# Near-identical boxes of one label are a repetition loop, not two objects.
DEDUPE_IOU = 0.7

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)
_PNG_PREFIX = "data:image/png;base64,"
_LIST_KEYS = ("boxes", "objects", "detections", "items", "results")


class BadAnswer(ValueError):
    """The text holds no usable JSON at all (not even a salvageable object)."""


@dataclass
class ParseStats:
    """What parsing did to the answer; ``dropped`` counts by reason, for metrics and logs."""

    items: int = 0
    truncated: bool = False
    salvaged: bool = False
    dropped: Counter = field(default_factory=Counter)
    mask_fallbacks: int = 0  # wanted a mask, got none/garbage: the box was filled instead

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "truncated": self.truncated,
            "salvaged": self.salvaged,
            "dropped": dict(self.dropped),
            "mask_fallbacks": self.mask_fallbacks,
        }


# --- text to items -------------------------------------------------------------------------------

def strip_fences(text: str) -> str:
    """The JSON inside a markdown code fence, or the text itself (an unclosed fence counts)."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip()


def _items_from(value: Any) -> list[Any] | None:
    """The detection list inside a decoded JSON value, in any of the shapes Gemini uses."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key in _LIST_KEYS:
            if isinstance(value.get(key), list):
                return value[key]
        if "box_2d" in value:  # a single object instead of a list of one
            return [value]
    return None


def _salvage(text: str) -> list[dict]:
    """Complete ``{...}`` objects of the detection array from truncated or broken JSON.

    Scans from the array start (the top-level ``[`` or the one after ``"boxes"``), tracking
    strings so brackets inside labels or base64 do not count, and parses each object that
    closes at the array's own depth; the cut-off tail is ignored.
    """
    key = re.search(r'"(?:{})"\s*:\s*\['.format("|".join(_LIST_KEYS)), text)
    bracket, brace = text.find("["), text.find("{")
    if key:
        start, base = key.end() - 1, 1
    elif bracket >= 0 and (brace < 0 or bracket < brace):
        start, base = bracket, 1
    elif brace >= 0:
        start, base = brace, 0  # a bare run of objects
    else:
        return []
    objects: list[dict] = []
    depth, in_string, escaped, obj_start = 0, False, False, -1
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if char == "{" and depth == base + 1:
                obj_start = i
        elif char in "]}":
            if char == "}" and depth == base + 1 and obj_start >= 0:
                try:
                    parsed = json.loads(text[obj_start:i + 1])
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    objects.append(parsed)
                obj_start = -1
            depth -= 1
            if depth < base:
                break  # the array closed: the rest is not ours
    return objects


def load_items(text: str) -> tuple[list[Any], bool]:
    """Decode the answer's detection list; returns ``(items, salvaged)``.

    Raises :class:`BadAnswer` when the text is neither JSON nor holds any complete object (a
    real "nothing found" is a valid ``[]``, never a salvage).
    """
    body = strip_fences(text or "")
    try:
        items = _items_from(json.loads(body))
    except ValueError:
        items = None
    else:
        if items is None:
            raise BadAnswer(f"JSON without a detection list: {body[:120]!r}")
        return items, False
    salvaged = _salvage(body)
    if not salvaged:
        raise BadAnswer(f"no complete object in: {body[:120]!r}")
    return salvaged, True


# --- items to detections -------------------------------------------------------------------------

def _box(item: Any) -> list[float] | None:
    box = item.get("box_2d") if isinstance(item, dict) else None
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _score(item: dict, default: float) -> float:
    for key in ("confidence", "score"):
        value = item.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(min(max(value, 0.0), 1.0))
    return default


def _png_mask(data: str, xyxy: np.ndarray, width: int, height: int) -> np.ndarray | None:
    try:
        raw = base64.b64decode(data[len(_PNG_PREFIX):], validate=False)
        probability = np.asarray(Image.open(io.BytesIO(raw)).convert("L"))
    except (binascii.Error, OSError, ValueError):
        return None
    return gemini_mask_to_full(probability, xyxy, width, height)


def _polygon_mask(points: list, width: int, height: int) -> np.ndarray | None:
    try:
        xy = np.asarray(points, dtype=float).reshape(-1, 2)
    except (TypeError, ValueError):
        return None
    if len(xy) < 3 or not np.isfinite(xy).all():
        return None
    return polygon_to_mask(gemini_points_to_pixels(xy, width, height), width, height)


def _mask(item: dict, xyxy: np.ndarray, width: int, height: int) -> np.ndarray | None:
    value = item.get("mask")
    if isinstance(value, str) and value.startswith(_PNG_PREFIX):
        return _png_mask(value, xyxy, width, height)
    if isinstance(value, list):
        return _polygon_mask(value, width, height)
    return None


def parse_answer(
    text: str,
    image_size: tuple[int, int],
    config: ProjectConfig,
    *,
    max_objects: int,
    finish_reason: str | None = None,
    model: str = "",
    default_score: float = DEFAULT_SCORE,
    iou_threshold: float = DEDUPE_IOU,
    want_masks: bool | None = None,
    fallback_label: str | None = None,
) -> tuple[Detections, ParseStats]:
    """Gemini's answer text to pixel Detections on the ORIGINAL image of ``image_size``.

    ``box_2d`` is relative to the image Gemini saw; a downscale that kept the aspect ratio maps
    straight back. Labels go through ``config.match_label``; unknown ones are dropped unless
    ``fallback_label`` is given (interactive queries label everything found). ``want_masks``
    defaults to ``config.wants_masks``. Raises :class:`BadAnswer` on unusable text.
    """
    width, height = image_size
    stats = ParseStats(truncated=finish_reason == "MAX_TOKENS")
    items, stats.salvaged = load_items(text)
    stats.truncated = stats.truncated or stats.salvaged
    stats.items = len(items)

    boxes: list[np.ndarray] = []
    labels: list[str] = []
    scores: list[float] = []
    kept_items: list[dict] = []
    for item in items:
        box = _box(item)
        if box is None:
            stats.dropped["malformed"] += 1
            continue
        xyxy = gemini_to_xyxy(box, width, height)
        if box_area(xyxy)[0] <= 0:
            stats.dropped["zero_area"] += 1
            continue
        raw_label = item.get("label")
        label = config.match_label(raw_label) if isinstance(raw_label, str) and raw_label.strip() else None
        if label is None:
            if fallback_label is None:
                stats.dropped["unknown_label"] += 1
                continue
            label = fallback_label
        boxes.append(xyxy)
        labels.append(label)
        scores.append(_score(item, default_score))
        kept_items.append(item)

    xyxy_all = np.array(boxes, dtype=float).reshape(-1, 4)
    score_all = np.array(scores, dtype=float)
    keep = nms_keep(xyxy_all, score_all, labels, iou_threshold) if labels else np.zeros(0, dtype=int)
    stats.dropped["duplicate"] += len(labels) - len(keep)
    if len(keep) > max_objects:
        # Keep Gemini's own order among equal scores (it lists the salient objects first).
        ranked = sorted(keep, key=lambda i: (-score_all[i], i))[:max_objects]
        stats.dropped["over_cap"] += len(keep) - max_objects
        keep = np.array(sorted(ranked), dtype=int)
    stats.dropped = Counter({k: v for k, v in stats.dropped.items() if v})

    masks = None
    if (config.wants_masks if want_masks is None else want_masks) and len(keep):
        mask_list = []
        for i in keep:
            mask = _mask(kept_items[i], xyxy_all[i], width, height)
            if mask is None or not mask.any():
                stats.mask_fallbacks += 1
                mask = box_to_mask(xyxy_all[i], width, height)
            mask_list.append(mask)
        masks = np.stack(mask_list)

    detections = Detections(
        xyxy_all[keep] if len(keep) else np.zeros((0, 4)),
        [labels[i] for i in keep],
        score_all[keep] if len(keep) else np.zeros(0),
        (width, height),
        "gemini",
        model,
        masks,
        {"truncated": stats.truncated, "dropped": dict(stats.dropped)},
    )
    return detections, stats
