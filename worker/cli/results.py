"""The per-image result file of ``lsb detect`` (schema ``lsb.detections/1``) and its annotated PNG.

One JSON per image, written atomically (temporary file, then rename), so a file that exists with
``"complete": true`` is a finished image and a re-run skips it::

    {
      "schema": "lsb.detections/1",
      "complete": true,
      "created_at": "2026-01-01T12:00:00Z",
      "image": {"name": "site/a.jpg",            # path relative to the input root (or URL basename)
                "path": "/abs/site/a.jpg",       # local file, or null
                "url": null,                     # http(s)/gs/s3 URL, or null
                "width": 1280, "height": 720,    # after EXIF transpose (what Label Studio shows)
                "sha256": "..."},                # of the original bytes
      "source": "gemini" | "yolo" | "owlvit",
      "model": "gemini-2.5-flash",
      "labels": ["Helmet", "Person"],            # the label config's labels, in order
      "label_config": "<View>...</View>",        # the config the drafts were made for
      "query": null,                             # the free-text query, when one was given
      "objects": [{
          "label": "Helmet", "score": 0.87,
          "box": {"xyxy": [x0, y0, x1, y1],      # pixels of the original image
                  "ls": {"x": .., "y": .., "width": .., "height": .., "rotation": 0}},  # Label Studio percent
          "mask": null | {"rle": {"size": [h, w], "counts": "..."},   # COCO compressed RLE
                          "polygon": [[x, y], ...],                    # outline of the largest part, pixels
                          "area": 1234}                                # pixels
      }],
      "meta": {"latency_s": 1.2, "cost_usd": 0.0004, "cached": false, ...}   # detector's own meta
    }

Every conversion goes through :mod:`backend.core.geometry`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.core import geometry
from backend.core.detections import Detections

SCHEMA = "lsb.detections/1"
ANNOTATED_SUFFIX = ".annotated.png"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def to_json(detections: Detections, image: dict, labels: list[str], label_config: str, query: str | None = None) -> dict:
    """The result document for one image (see the module docstring)."""
    width, height = detections.image_size
    objects = []
    for i, label in enumerate(detections.labels):
        box = detections.xyxy[i]
        obj: dict[str, Any] = {
            "label": label,
            "score": round(float(detections.scores[i]), 6),
            "box": {"xyxy": [round(float(v), 3) for v in box],
                    "ls": {k: (round(v, 6) if isinstance(v, float) else v)
                           for k, v in geometry.xyxy_to_ls(box, width, height).items()}},
            "mask": None,
        }
        if detections.masks is not None:
            mask = detections.masks[i]
            polygon = geometry.mask_to_polygon(mask)
            obj["mask"] = {
                "rle": geometry.mask_to_rle(mask),
                "polygon": None if polygon is None else np.round(polygon, 2).tolist(),
                "area": int(mask.sum()),
            }
        objects.append(obj)
    return {
        "schema": SCHEMA,
        "complete": True,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "image": {**image, "width": int(width), "height": int(height)},
        "source": detections.source,
        "model": detections.model,
        "labels": list(labels),
        "label_config": label_config,
        "query": query,
        "objects": objects,
        "meta": _jsonable(detections.meta),
    }


def from_json(doc: dict) -> Detections:
    """The :class:`Detections` a result document holds (masks when every object has one)."""
    width, height = int(doc["image"]["width"]), int(doc["image"]["height"])
    objects = doc.get("objects") or []
    xyxy = np.array([o["box"]["xyxy"] for o in objects], dtype=float).reshape(-1, 4)
    masks = None
    if objects and all(o.get("mask") for o in objects):
        masks = np.stack([geometry.rle_to_mask(o["mask"]["rle"]) for o in objects])
    return Detections(xyxy, [str(o["label"]) for o in objects], np.array([float(o["score"]) for o in objects]),
                      (width, height), str(doc.get("source") or ""), str(doc.get("model") or ""), masks,
                      dict(doc.get("meta") or {}))


def read_result(path: Path) -> dict | None:
    """The document at ``path`` when it is a complete result, else None (missing, partial, other schema)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("complete") is not True:
        return None
    if not isinstance(doc.get("image"), dict) or not isinstance(doc.get("objects"), list):
        return None
    return doc


def iter_results(folder: Path) -> list[tuple[Path, dict]]:
    """Every complete result under ``folder`` (recursively), sorted by path."""
    out = []
    for path in sorted(Path(folder).rglob("*.json")):
        if path.name.startswith("."):
            continue
        doc = read_result(path)
        if doc is not None:
            out.append((path, doc))
    return out


def annotated_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.name[: -len(".json")] + ANNOTATED_SUFFIX)


def annotate(image: Image.Image, detections: Detections, labels: list[str]) -> Image.Image:
    """The image with mask overlays, boxes and "label score" captions (supervision's annotators)."""
    import supervision as sv  # heavy: supervision costs ~0.8 s to import; only when drawing

    scene = np.array(image.convert("RGB"))
    if not len(detections):
        return Image.fromarray(scene)
    names = list(dict.fromkeys([*labels, *detections.labels]))
    det = sv.Detections(
        xyxy=detections.xyxy.astype(float),
        confidence=detections.scores.astype(float),
        class_id=np.array([names.index(label) for label in detections.labels], dtype=int),
        mask=detections.masks,
    )
    short = min(image.size)
    thickness = max(1, short // 300)
    if detections.masks is not None:
        scene = sv.MaskAnnotator(opacity=0.4).annotate(scene, det)
    scene = sv.BoxAnnotator(thickness=thickness).annotate(scene, det)
    captions = [f"{label} {score:.2f}" for label, score in zip(detections.labels, detections.scores)]
    scene = sv.LabelAnnotator(text_scale=max(0.35, short / 1200), text_thickness=max(1, short // 600), text_padding=3,
                              smart_position=True).annotate(scene, det, labels=captions)
    return Image.fromarray(scene)
