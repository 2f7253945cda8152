"""Every box, polygon and mask format conversion of the project, and nothing else.

Formats:
- pixels ``xyxy``: absolute ``[x_min, y_min, x_max, y_max]`` in the original image (internal).
- Gemini: ``box_2d = [y_min, x_min, y_max, x_max]`` integers on 0-1000, y first.
- Label Studio: ``x, y, width, height`` in percent (0-100) of the original image, rotation in
  degrees clockwise around the top-left corner; polygons as ``[[x%, y%], ...]``.
- YOLO: normalised ``cx, cy, w, h`` (0-1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

GEMINI_SCALE = 1000.0


# --- Gemini ------------------------------------------------------------------------------------

def gemini_to_xyxy(box_2d: Sequence[float], width: int, height: int) -> np.ndarray:
    """Gemini ``[ymin, xmin, ymax, xmax]`` on 0-1000 to pixel xyxy.

    Survives Gemini's misbehaviour: swapped corners are ordered, values outside 0-1000 clamped.
    The 0-1000 grid is relative to the image Gemini saw, so a downscaled upload maps back exactly
    as long as the aspect ratio was kept.
    """
    y0, x0, y1, x1 = (min(max(float(v), 0.0), GEMINI_SCALE) for v in box_2d)
    y0, y1 = sorted((y0, y1))
    x0, x1 = sorted((x0, x1))
    return np.array([x0 * width, y0 * height, x1 * width, y1 * height]) / GEMINI_SCALE


def xyxy_to_gemini(xyxy: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel xyxy to Gemini's 0-1000 ``[ymin, xmin, ymax, xmax]`` (used by the fake server and tests)."""
    x0, y0, x1, y1 = xyxy
    return [round(y0 / height * 1000), round(x0 / width * 1000), round(y1 / height * 1000), round(x1 / width * 1000)]


def gemini_points_to_pixels(points: Iterable[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Gemini polygon points to pixel ``(x, y)`` rows, clamped.

    Unlike ``box_2d``, the polygon masks of newer Gemini models are ``[x, y]`` on 0-1000
    (supervision 0.31's Gemini 3 parser reads them the same way).
    """
    pts = np.clip(np.asarray(list(points), dtype=float).reshape(-1, 2), 0, GEMINI_SCALE)
    return pts * np.array([width, height]) / GEMINI_SCALE


def gemini_mask_to_full(probability: np.ndarray, xyxy: Sequence[float], width: int, height: int,
                        threshold: int = 127) -> np.ndarray:
    """A Gemini 2.5 mask (a 0-255 map covering only the box) to a full-image boolean mask."""
    full = np.zeros((height, width), dtype=bool)
    bx0, by0, bx1, by1 = (round(float(v)) for v in xyxy)
    x0, y0 = max(bx0, 0), max(by0, 0)
    x1, y1 = min(bx1, width), min(by1, height)
    if x1 <= x0 or y1 <= y0 or probability.size == 0:
        return full
    # Resize to the whole box, then crop to the image: a box reaching past an edge keeps its map aligned.
    resized = cv2.resize(probability.astype(np.uint8), (bx1 - bx0, by1 - by0), interpolation=cv2.INTER_LINEAR)
    full[y0:y1, x0:x1] = resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] > threshold
    return full


# --- Label Studio ------------------------------------------------------------------------------

def xyxy_to_ls(xyxy: Sequence[float], width: int, height: int) -> dict[str, float]:
    """Pixel xyxy to Label Studio's rectangle value (percent, clamped to the image)."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return {
        "x": x0 / width * 100.0,
        "y": y0 / height * 100.0,
        "width": (x1 - x0) / width * 100.0,
        "height": (y1 - y0) / height * 100.0,
        "rotation": 0,
    }


def ls_to_xyxy(value: dict, width: int, height: int) -> np.ndarray:
    """Label Studio rectangle value to pixel xyxy.

    A rotated rectangle (rotation around its top-left corner) becomes its axis-aligned bounding
    box, clipped to the image.
    """
    x = float(value["x"]) / 100.0 * width
    y = float(value["y"]) / 100.0 * height
    w = float(value["width"]) / 100.0 * width
    h = float(value["height"]) / 100.0 * height
    rotation = float(value.get("rotation") or 0.0) % 360.0
    if rotation:
        theta = math.radians(rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]])
        rotated = corners @ np.array([[cos, sin], [-sin, cos]]) + np.array([x, y])
        x0, y0 = rotated.min(axis=0)
        x1, y1 = rotated.max(axis=0)
    else:
        x0, y0, x1, y1 = x, y, x + w, y + h
    return np.array([
        min(max(x0, 0.0), width), min(max(y0, 0.0), height),
        min(max(x1, 0.0), width), min(max(y1, 0.0), height),
    ])


def pixels_to_ls_points(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel ``(x, y)`` polygon points to Label Studio percent points."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    return [[float(px) / width * 100.0, float(py) / height * 100.0] for px, py in pts]


def ls_points_to_pixels(points: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    return pts / 100.0 * np.array([width, height])


# --- YOLO --------------------------------------------------------------------------------------

def xyxy_to_yolo(xyxy: Sequence[float], width: int, height: int) -> np.ndarray:
    """Pixel xyxy to normalised YOLO ``cx, cy, w, h``."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return np.array([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height])


def yolo_to_xyxy(cxcywh: Sequence[float], width: int, height: int) -> np.ndarray:
    cx, cy, w, h = (float(v) for v in cxcywh)
    return np.array([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])


# --- box maths ---------------------------------------------------------------------------------

def box_area(xyxy: np.ndarray) -> np.ndarray:
    b = np.asarray(xyxy, dtype=float).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU matrix of two pixel-xyxy arrays, shape ``(len(a), len(b))``."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms_keep(xyxy: np.ndarray, scores: np.ndarray, labels: Sequence[str], iou_threshold: float) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, best score first (dedupes Gemini repetition loops)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    keep: list[int] = []
    iou = box_iou(xyxy, xyxy)
    for i in order:
        if all(labels[i] != labels[k] or iou[i, k] <= iou_threshold for k in keep):
            keep.append(int(i))
    return np.array(sorted(keep), dtype=int)


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after downscaling so the long side is at most ``max_side`` (aspect kept, never upscaled)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# --- masks and polygons ------------------------------------------------------------------------

def box_to_mask(xyxy: Sequence[float], width: int, height: int) -> np.ndarray:
    """A filled box as a mask (stands in when a mask was wanted but the detector gave none)."""
    x0, y0, x1, y1 = xyxy
    return polygon_to_mask(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), width, height)


def polygon_to_mask(points_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fill a pixel polygon into a boolean mask."""
    mask = np.zeros((height, width), dtype=np.uint8)
    pts = np.round(np.asarray(points_px, dtype=float).reshape(-1, 2)).astype(np.int32)
    if len(pts) >= 3:
        cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0) -> np.ndarray | None:
    """The outline of a mask's largest component as pixel ``(x, y)`` points, or None when empty."""
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    approx = cv2.approxPolyDP(largest, tolerance, True).reshape(-1, 2)
    return approx.astype(float) if len(approx) >= 3 else None


def mask_to_xyxy(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


# --- COCO, YOLO polygons, RLE (added for the seed pipelines: lsb export / eval) -----------------

def xyxy_to_coco(xyxy: Sequence[float]) -> list[float]:
    """Pixel xyxy to COCO ``[x, y, width, height]`` (top-left corner, pixels)."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_to_xyxy(xywh: Sequence[float]) -> np.ndarray:
    """COCO ``[x, y, width, height]`` to pixel xyxy."""
    x, y, w, h = (float(v) for v in xywh)
    return np.array([x, y, x + w, y + h])


def points_to_xyxy(points_px: np.ndarray) -> np.ndarray:
    """The bounding box of pixel ``(x, y)`` polygon points."""
    pts = np.asarray(points_px, dtype=float).reshape(-1, 2)
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])


def polygon_to_coco(points_px: np.ndarray) -> list[float]:
    """Pixel ``(x, y)`` polygon points to one COCO segmentation polygon ``[x1, y1, x2, y2, ...]``."""
    return [float(v) for v in np.asarray(points_px, dtype=float).reshape(-1)]


def coco_to_polygon(flat: Sequence[float]) -> np.ndarray:
    """One COCO segmentation polygon ``[x1, y1, x2, y2, ...]`` to pixel ``(x, y)`` rows."""
    return np.asarray(flat, dtype=float).reshape(-1, 2)


def yolo_points_to_pixels(points: Sequence[float], width: int, height: int) -> np.ndarray:
    """YOLO segmentation label points (normalised ``x y x y ...``, 0-1) to pixel ``(x, y)`` rows."""
    return np.asarray(points, dtype=float).reshape(-1, 2) * np.array([width, height])


def mask_to_rle(mask: np.ndarray) -> dict:
    """A boolean mask to COCO compressed RLE ``{"size": [height, width], "counts": str}`` (JSON-safe)."""
    from pycocotools import mask as mask_utils  # heavy: pycocotools, only for RLE masks (the web process never needs it)

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list ``counts``) to a boolean ``(height, width)`` mask."""
    from pycocotools import mask as mask_utils  # heavy: pycocotools, only for RLE masks (the web process never needs it)

    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        compressed = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(compressed).astype(bool)


def coco_segmentation_to_mask(segmentation, width: int, height: int) -> np.ndarray:
    """A COCO annotation's ``segmentation`` (list of polygons, or RLE) to a boolean mask."""
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation)
    mask = np.zeros((height, width), dtype=bool)
    for flat in segmentation or []:
        if len(flat) >= 6:
            mask |= polygon_to_mask(coco_to_polygon(flat), width, height)
    return mask


class BrushMaskError(ValueError):
    """A BrushLabels RLE that cannot be this image's mask (refused before anything is allocated)."""


# The decoded mask of a brush region is width x height x 4 bytes (RGBA): the largest image the
# loader accepts (IMAGE_MAX_PIXELS' default) bounds it, whatever size a region claims.
MAX_BRUSH_PIXELS = 80_000_000


def brush_rle_length(rle: Sequence[int]) -> int:
    """The value count an LS brush RLE declares: its first 32 bits, big-endian (label_studio_sdk's
    ``decode_rle`` reads the same header, then allocates that many bytes before decoding a bit)."""
    if len(rle) < 4:
        raise BrushMaskError("brush rle is shorter than its 4-byte header")
    try:
        return int.from_bytes(bytes(rle[:4]), "big")
    except (TypeError, ValueError):
        raise BrushMaskError("brush rle is not a list of bytes (0-255)") from None


def ls_brush_to_mask(rle: Sequence[int], width: int, height: int, max_pixels: int = MAX_BRUSH_PIXELS) -> np.ndarray:
    """A Label Studio BrushLabels ``rle`` to a boolean ``(height, width)`` mask.

    The header is checked against the image before decoding: a 4 KB RLE may declare 4 G values, and
    the SDK's decoder would allocate them. Raises :class:`BrushMaskError` (a ``ValueError``) when the
    declared count is not ``width * height * 4``, the image is over ``max_pixels``, or the RLE is corrupt.
    """
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise BrushMaskError(f"brush mask of a {width}x{height} image exceeds {max_pixels} pixels")
    declared = brush_rle_length(rle)
    if declared != width * height * 4:
        raise BrushMaskError(f"brush rle declares {declared} values, a {width}x{height} RGBA mask has {width * height * 4}")
    try:
        flat = np.asarray(decode_rle(list(rle)), dtype=np.uint8)
    except (IndexError, TypeError, ValueError) as exc:  # the SDK's reader on truncated or odd bits
        raise BrushMaskError(f"brush rle does not decode: {type(exc).__name__}") from None
    return flat.reshape(height, width, 4)[:, :, 3] > 0
