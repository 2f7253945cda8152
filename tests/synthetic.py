"""Synthetic detection data with known boxes, for tests anywhere in the project.

Each class is a shape with its own colour (easy to learn in a few epochs): ``Car`` is a red
rectangle, ``Person`` a blue ellipse, ``Sign`` a green tall rectangle. Images are drawn on plain
or noisy backgrounds; every object's pixel box is known exactly, and :func:`ls_result` turns the
boxes into Label Studio ``rectanglelabels`` regions (through :mod:`backend.core.geometry`).

    images = make_images(24, seed=1)
    task_result = ls_result(images[0].boxes, images[0].width, images[0].height)
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from backend.core.geometry import xyxy_to_ls

DEFAULT_CLASSES = ("Car", "Person", "Sign")
_COLOURS = {
    "Car": (220, 30, 30),
    "Person": (30, 60, 220),
    "Sign": (30, 180, 40),
}
_EXTRA_COLOURS = [(200, 160, 20), (160, 30, 200), (20, 190, 190), (240, 120, 0)]


@dataclass
class Box:
    label: str
    xyxy: tuple[float, float, float, float]


@dataclass
class SyntheticImage:
    image: Image.Image
    boxes: list[Box] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def encode(self, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, fmt)
        return buf.getvalue()


def colour(label: str, classes: Sequence[str] = DEFAULT_CLASSES) -> tuple[int, int, int]:
    if label in _COLOURS:
        return _COLOURS[label]
    return _EXTRA_COLOURS[list(classes).index(label) % len(_EXTRA_COLOURS)]


def _background(rng: np.random.Generator, width: int, height: int, noisy: bool) -> Image.Image:
    if noisy:
        base = rng.integers(90, 200, size=3)
        noise = rng.normal(0, 25, size=(height, width, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "RGB")
    shade = int(rng.integers(200, 250))
    return Image.new("RGB", (width, height), (shade, shade, shade))


def _draw(draw: ImageDraw.ImageDraw, label: str, xyxy: tuple[float, float, float, float], classes: Sequence[str]) -> None:
    x0, y0, x1, y1 = xyxy
    fill = colour(label, classes)
    # Drawn shapes cover pixels x0..x1-1: the box's right/bottom edge is exclusive.
    if label == "Person":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)


def _shape_size(rng: np.random.Generator, label: str, width: int, height: int) -> tuple[int, int]:
    short = min(width, height)
    w = int(rng.integers(max(6, short // 6), max(8, short // 2.5)))
    h = int(rng.integers(max(6, short // 6), max(8, short // 2.5)))
    if label == "Sign":  # tall
        w, h = min(w, h), max(w, h) + short // 8
    elif label == "Car":  # wide
        w, h = max(w, h) + short // 8, min(w, h)
    return min(w, width - 2), min(h, height - 2)


def make_image(
    rng: np.random.Generator,
    width: int = 128,
    height: int = 96,
    classes: Sequence[str] = DEFAULT_CLASSES,
    n_objects: int = 2,
    noisy: bool = False,
    max_overlap: float = 0.1,
) -> SyntheticImage:
    """One image with up to ``n_objects`` non-overlapping shapes of random classes."""
    from backend.core.geometry import box_iou

    image = _background(rng, width, height, noisy)
    draw = ImageDraw.Draw(image)
    boxes: list[Box] = []
    for _ in range(n_objects):
        label = str(classes[int(rng.integers(len(classes)))])
        for _attempt in range(20):
            w, h = _shape_size(rng, label, width, height)
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            xyxy = (float(x0), float(y0), float(x0 + w), float(y0 + h))
            if not boxes or box_iou(np.array([xyxy]), np.array([b.xyxy for b in boxes])).max() <= max_overlap:
                boxes.append(Box(label, xyxy))
                _draw(draw, label, xyxy, classes)
                break
    return SyntheticImage(image, boxes)


def make_images(
    n: int,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    size: tuple[int, int] = (128, 96),
    noisy: bool = False,
    max_objects: int = 3,
    negative_every: int = 0,
) -> list[SyntheticImage]:
    """``n`` images; every ``negative_every``-th one (if set) has no objects at all."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        negative = max_objects <= 0 or (negative_every and i % negative_every == negative_every - 1)
        count = 0 if negative else int(rng.integers(1, max_objects + 1))
        out.append(make_image(rng, size[0], size[1], classes, count, noisy))
    return out


def noise_images(n: int, seed: int = 0, size: tuple[int, int] = (128, 96)) -> list[SyntheticImage]:
    """Pure noise with no objects (for deliberately bad candidates)."""
    rng = np.random.default_rng(seed)
    return [SyntheticImage(_background(rng, size[0], size[1], True)) for _ in range(n)]


# --- Label Studio shapes -------------------------------------------------------------------------

def label_config(classes: Sequence[str] = DEFAULT_CLASSES, tag: str = "RectangleLabels", name: str = "label",
                 image: str = "image") -> str:
    labels = "".join(f'<Label value="{c}"/>' for c in classes)
    return f'<View><Image name="{image}" value="${image}"/><{tag} name="{name}" toName="{image}">{labels}</{tag}></View>'


def ls_region(box: Box, width: int, height: int, from_name: str = "label", to_name: str = "image", score: float | None = None,
              source: str | None = None) -> dict:
    value = {**xyxy_to_ls(box.xyxy, width, height), "rectanglelabels": [box.label]}
    region = {
        "id": uuid.uuid4().hex[:10],
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
    }
    if score is not None:
        region["score"] = float(score)
    if source is not None:
        region["meta"] = {"source": source}
    return region


def ls_result(boxes: Sequence[Box], width: int, height: int, **kwargs) -> list[dict]:
    return [ls_region(b, width, height, **kwargs) for b in boxes]


def perturb(
    boxes: Sequence[Box],
    rng: np.random.Generator,
    width: int,
    height: int,
    jitter: float = 0.05,
    drop: float = 0.0,
    extra: float = 0.0,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> list[tuple[Box, float]]:
    """Imperfect drafts of ``boxes``: jittered, some dropped, some spurious; with scores."""
    out: list[tuple[Box, float]] = []
    for b in boxes:
        if rng.random() < drop:
            continue
        x0, y0, x1, y1 = b.xyxy
        w, h = x1 - x0, y1 - y0
        d = rng.normal(0, jitter, size=4) * np.array([w, h, w, h])
        nb = (max(0.0, x0 + d[0]), max(0.0, y0 + d[1]), min(width, x1 + d[2]), min(height, y1 + d[3]))
        out.append((Box(b.label, nb), float(rng.uniform(0.5, 0.99))))
    if rng.random() < extra:
        w, h = width // 5, height // 5
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        label = str(classes[int(rng.integers(len(classes)))])
        out.append((Box(label, (x0, y0, x0 + w, y0 + h)), float(rng.uniform(0.1, 0.6))))
    return out


def draft_result(drafts: Sequence[tuple[Box, float]], width: int, height: int, source: str | None = None, **kwargs) -> list[dict]:
    return [ls_region(b, width, height, score=s, source=source, **kwargs) for b, s in drafts]


def crafted_brush_rle(declared: int, size_bytes: int = 4096) -> list[int]:
    """A Label Studio brush RLE of ``size_bytes`` whose 32-bit header declares ``declared`` values.

    Its body is 27-bit fill runs of 65,536 values each (8-bit words, 16-bit run lengths): fed to the
    SDK's decoder, 4 KB of it fill about 80 MB of the array the header made it allocate.
    """
    bits = f"{declared:032b}" + f"{8 - 1:05b}" + "1111" * 4
    run = "1" + "11" + "1" * 16 + "1" * 8
    bits += run * (size_bytes * 8 // len(run) + 1)
    bits = bits[: size_bytes * 8]
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
