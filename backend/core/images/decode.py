"""Bytes to an RGB picture: format sniffing, pixel limits, EXIF orientation, mode conversion.

Only raster formats Pillow decodes in-process are opened (no EPS/Ghostscript, no SVG), and the pixel
count is checked on the header before anything is decoded.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.core.images.errors import ImageError

log = logging.getLogger(__name__)

# Raster formats Pillow decodes in-process (JPEG includes phones' MPO). EPS would shell out to
# Ghostscript; the other exotic formats are rare enough that refusing them costs nothing.
Image.init()
_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF") if f in Image.OPEN)


def _looks_like_svg(head: bytes, content_type: str) -> bool:
    return "svg" in content_type or b"<svg" in head[:4096].lower()


def _looks_like_text(head: bytes, content_type: str) -> bool:
    if content_type.startswith(("text/", "application/json", "application/xml", "application/pdf")):
        return True
    stripped = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    return stripped.startswith((b"<", b"{", b"[", b"%PDF"))


def _pillow_open() -> Callable[..., Image.Image]:
    """Pillow's own ``Image.open``. Importing ultralytics replaces it process-wide with a wrapper
    that, on any unidentified file, runs a requirements check (a pip install when autoinstall is
    on) and loads a HEIF plugin; untrusted bytes must not trigger either. Looked up per call
    because ultralytics may be imported after this module."""
    opener = Image.open
    if getattr(opener, "__module__", Image.__name__) != Image.__name__:
        original = getattr(sys.modules.get(opener.__module__), "_image_open", None)
        if getattr(original, "__module__", None) == Image.__name__:
            return original
    return opener


def _stretch_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale: linear stretch of the used range to 0-255. A plain
    ``convert("L")`` clips at 255, which turns any 16-bit image white."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:
        arr = np.full(arr.shape, 255.0 if hi > 255 else max(hi, 0.0), dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white (what a viewer shows)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _stretch_to_rgb(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int, content_type: str = "") -> Image.Image:
    """Decode ``data`` to an RGB, EXIF-transposed first frame.

    The pixel limit is checked on the header, before anything is decoded, per call (Pillow's
    ``MAX_IMAGE_PIXELS`` is a process global and stays untouched as a second fence).
    """
    content_type = content_type.split(";")[0].strip().lower()
    if not data:
        raise ImageError("decode_error", "empty file")
    try:
        im = _pillow_open()(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("bomb", f"image declares too many pixels ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, or any of the many types malformed headers raise
        if _looks_like_svg(data, content_type):
            raise ImageError("unsupported_format", "SVG is a vector format and is not supported; use PNG or JPEG") from None
        if _looks_like_text(data, content_type):
            raise ImageError("not_an_image", f"content is not an image ({content_type or 'text'})") from None
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError("decode_error", "unrecognised or unsupported image format") from None
        raise ImageError("decode_error", f"cannot read image header ({type(exc).__name__})") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError("decode_error", "image has no pixels")
    if width * height > max_pixels:
        raise ImageError("bomb", f"{width}x{height} exceeds IMAGE_MAX_PIXELS={max_pixels}")
    try:
        im.seek(0)
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF: browsers ignore it too, so keep the stored orientation
            log.debug("ignoring unreadable EXIF orientation")
        return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("bomb", str(exc)) from None
    except Exception as exc:
        raise ImageError("decode_error", f"cannot decode {im.format or 'image'} ({exc})") from None
