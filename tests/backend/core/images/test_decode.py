"""Decoding: every mode and format to RGB, EXIF orientation, first frame, bombs, non-images."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFile

from backend.core.images import ImageError, decode, decode_image
from tests.backend.core.images.helpers import close, encode, png_header_only, reason_of, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


def test_exif_orientation_6_is_transposed(make_loader, ls):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    ls.files["/data/upload/1/rot.jpg"] = (encode(red_blue(40, 20), "JPEG", exif=exif, quality=95), "image/jpeg")
    loaded = make_loader().load("/data/upload/1/rot.jpg")
    assert (loaded.width, loaded.height) == (20, 40) == loaded.image.size
    assert close(loaded.image.getpixel((10, 2)), (255, 0, 0), 40)   # former left edge is now on top
    assert close(loaded.image.getpixel((10, 37)), (0, 0, 255), 40)


def _rgba() -> Image.Image:
    """Left half fully transparent red (composited on white), right half opaque blue."""
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (8, 0, 16, 16))
    return im


def _gradient16(high: int) -> Image.Image:
    arr = np.tile(np.linspace(0, high, 64).astype(np.uint16), (16, 1))
    return Image.fromarray(arr)  # mode I;16


@pytest.mark.parametrize("name, data, checks", [
    ("cmyk", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), [((8, 8), (255, 0, 0))]),
    ("gray", encode(Image.new("L", (16, 16), 100)), [((8, 8), (100, 100, 100))]),
    ("bilevel", encode(Image.new("1", (16, 16), 1)), [((8, 8), (255, 255, 255))]),
    ("palette", encode(Image.new("RGB", (16, 16), (0, 200, 0)).quantize(4)), [((8, 8), (0, 200, 0))]),
    ("rgba", encode(_rgba()), [((2, 8), (255, 255, 255)), ((12, 8), (0, 0, 255))]),
    ("palette-transparent", encode(_rgba().convert("P")), [((12, 8), (0, 0, 255))]),
    ("la", encode(Image.new("LA", (16, 16), (50, 255))), [((8, 8), (50, 50, 50))]),
    ("tiff", encode(red_blue(), "TIFF"), [((2, 2), (255, 0, 0)), ((30, 2), (0, 0, 255))]),
    ("tiff-lzw", encode(red_blue(), "TIFF", compression="tiff_lzw"), [((2, 2), (255, 0, 0))]),
    ("webp", encode(red_blue(), "WEBP", lossless=True), [((2, 2), (255, 0, 0)), ((30, 2), (0, 0, 255))]),
    ("bmp", encode(red_blue(), "BMP"), [((2, 2), (255, 0, 0))]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_modes_and_formats_become_rgb(make_loader, ls, name, data, checks):
    ls.files[f"/data/upload/1/{name}"] = (data, "application/octet-stream")
    loaded = make_loader().load(f"/data/upload/1/{name}")
    assert loaded.image.mode == "RGB"
    for xy, rgb in checks:
        assert close(loaded.image.getpixel(xy), rgb), (name, loaded.image.getpixel(xy))


@pytest.mark.parametrize("high", [65535, 4095])
def test_16bit_grayscale_is_scaled_not_clipped(make_loader, ls, high):
    data = encode(_gradient16(high))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    ls.files["/data/upload/1/g16.png"] = (data, "image/png")
    arr = np.asarray(make_loader().load("/data/upload/1/g16.png").image)
    assert arr[..., 0].min() <= 5 and arr[..., 0].max() >= 250
    assert 100 < arr.mean() < 155


def test_animated_gif_first_frame(make_loader, ls):
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    ls.files["/data/upload/1/anim.gif"] = (data, "image/gif")
    loaded = make_loader().load("/data/upload/1/anim.gif")
    assert loaded.image.mode == "RGB" and close(loaded.image.getpixel((6, 6)), (255, 0, 0))


@pytest.mark.parametrize("data", [
    encode(red_blue(200, 200), "JPEG")[:400],
    b"",
    random.Random(7).randbytes(5000),
], ids=["truncated-jpeg", "empty", "random"])
def test_undecodable_bytes(make_loader, ls, data):
    ls.files["/data/upload/1/bad"] = (data, "image/jpeg")
    assert reason_of(make_loader(), "/data/upload/1/bad") == "decode_error"


def test_decompression_bomb_is_refused_from_the_header(make_loader, ls, monkeypatch):
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    ls.files["/data/upload/1/bomb.png"] = (png_header_only(30000, 30000), "image/png")
    assert reason_of(make_loader(), "/data/upload/1/bomb.png") == "bomb"
    # Under Pillow's own limit but over ours: our per-call limit decides.
    ls.files["/data/upload/1/big.png"] = (encode(Image.new("L", (200, 200))), "image/png")
    assert reason_of(make_loader(image_max_pixels=10_000), "/data/upload/1/big.png") == "bomb"
    assert loads == [], "no pixel data decoded"
    assert Image.MAX_IMAGE_PIXELS != 10_000  # the global was not touched


def test_html_json_and_svg_are_refused(make_loader, ls, foreign):
    ls.files["/data/upload/1/page"] = (b"<!DOCTYPE html><html><body>Login</body></html>", "text/html; charset=utf-8")
    ls.files["/data/upload/1/json"] = (b'{"detail": "nope"}', "application/json")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    ls.files["/data/upload/1/pic.svg"] = (svg, "image/svg+xml")
    foreign.files["/pic.svg"] = (svg, "application/octet-stream")
    loader = make_loader()
    assert reason_of(loader, "/data/upload/1/page") == "not_an_image"
    assert reason_of(loader, "/data/upload/1/json") == "not_an_image"
    assert reason_of(loader, "/data/upload/1/pic.svg") == "unsupported_format"
    assert reason_of(loader, f"{foreign.url}/pic.svg") == "unsupported_format"
    assert reason_of(loader, "data:image/svg+xml;base64," + base64.b64encode(svg).decode()) == "unsupported_format"
    with pytest.raises(ImageError, match="SVG"):
        loader.load("/data/upload/1/pic.svg")


def test_direct_decode_helper():
    assert decode_image(encode(red_blue()), max_pixels=10**6).size == (40, 20)


def test_ultralytics_open_patch_is_bypassed():
    """conftest imports ultralytics, which wraps Image.open (pip-installing pi-heif on unknown
    files); the loader must use Pillow's own open."""
    assert decode._pillow_open().__module__ == "PIL.Image"
    with pytest.raises(ImageError) as info:
        decode_image(b"<html>nope</html>", max_pixels=100)
    assert info.value.reason == "not_an_image"
