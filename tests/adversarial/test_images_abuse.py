"""Hostile and odd images through POST /predict: one bad image per batch beside a good one.

The good task always gets its Gemini draft at the right place. The odd one is either handled (decoded
to RGB, EXIF applied, first frame, boxes in Label Studio percent of the image as shown) or fails alone:
an empty prediction for that task and a log line naming the task and the reason. The image loader's
own unit cases (formats, limits, headers) are in tests/backend/core/images/; this is the path through the
whole service: fake Label Studio over HTTP -> ImageLoader -> fake Gemini (real google-genai client)
-> control models -> JSON.
"""

from __future__ import annotations

import io
import logging
import random
import struct
import zlib

import numpy as np
import pytest
from flask import Response
from PIL import Image, ImageDraw, ImageOps

from tests import fake_gemini as fg
from tests.adversarial import CAR_BOX, RED, assert_box, car_picture, encode, predict_body, task
from tests.fake_label_studio import FakeLabelStudio

GOOD = "/data/upload/7/good-car.png"
GOOD_ID, BAD_ID = 1, 666


@pytest.fixture(scope="module")
def ls():
    """Fake Label Studio with an extra route: ``/data/upload/raw/<name>`` serves ``raw[name] = (bytes,
    content type)`` as is (HTML pages, SVG...). It sits under the upload path because the loader sends
    Label Studio's token only to media paths."""
    fake = FakeLabelStudio()
    fake.raw = {}

    @fake.app.get("/data/upload/raw/<name>")
    def raw(name):
        data, content_type = fake.raw[name]
        return Response(data, content_type=content_type)

    fake.files[GOOD] = encode(car_picture())
    with fake:
        yield fake


@pytest.fixture(scope="module")
def oracle():
    return fg.Oracle(colors={"Car": RED})


@pytest.fixture(scope="module")
def gemini(oracle):
    with fg.FakeGemini(responder=oracle) as fake:
        yield fake


@pytest.fixture
def predict(app_factory, private_redis, ls, gemini, caplog):
    """POST one batch [odd task, good task]; returns (odd prediction, log text about the odd task)."""
    handle = app_factory(private_redis.url, gemini=gemini, ls=ls)
    caplog.set_level(logging.INFO)

    def run(url: str, *, good_first: bool = False) -> tuple[dict, str]:
        caplog.clear()
        gemini.clear()
        tasks = [task(BAD_ID, url), task(GOOD_ID, GOOD)]
        if good_first:
            tasks.reverse()
        response = handle.client.post("/predict", json=predict_body(tasks))
        assert response.status_code == 200, response.get_data()
        results = response.json["results"]
        assert len(results) == 2
        odd, good = (results[1], results[0]) if good_first else (results[0], results[1])
        (region,) = good["result"]
        assert region["value"]["rectanglelabels"] == ["Car"] and region["meta"]["source"] == "gemini"
        assert_box(region, CAR_BOX, 64, 48)
        assert odd["model_version"] == good["model_version"] == "gemini:gemini-2.5-flash"
        lines = "\n".join(r.getMessage() for r in caplog.records if f"task {BAD_ID}:" in r.getMessage())
        return odd, lines

    return run


def failed_alone(odd: dict, log_lines: str, reason: str) -> None:
    assert odd == {"result": [], "score": 0.0, "model_version": "gemini:gemini-2.5-flash"}
    assert f"task {BAD_ID}: empty prediction (image {reason}:" in log_lines, log_lines


def served(odd: dict, log_lines: str) -> list[dict]:
    assert f"task {BAD_ID}:" in log_lines and "regions from gemini" in log_lines, log_lines
    return odd["result"]


def upload(ls: FakeLabelStudio, name: str, data: bytes) -> str:
    path = f"/data/upload/7/{name}"
    ls.files[path] = data
    return path


def raw(ls: FakeLabelStudio, name: str, data: bytes, content_type: str) -> str:
    ls.raw[name] = (data, content_type)
    return f"/data/upload/raw/{name}"


# --- images that must fail alone ---------------------------------------------------------------------

def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(3)
    data = encode(Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)), "JPEG", quality=90)
    return data[: len(data) // 2]


def _png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A real, complete PNG of width x height black pixels: about 100 KB that would decode to 100 MP."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("good_first", [False, True], ids=["bad-first", "good-first"])
def test_corrupt_bytes(predict, ls, good_first):
    url = upload(ls, "corrupt.jpg", b"\xff\xd8\xff\xe0" + random.Random(5).randbytes(4000))
    failed_alone(*predict(url, good_first=good_first), "decode_error")


def test_truncated_jpeg(predict, ls):
    failed_alone(*predict(upload(ls, "truncated.jpg", _truncated_jpeg())), "decode_error")


def test_zero_bytes(predict, ls):
    failed_alone(*predict(raw(ls, "zero.png", b"", "image/png")), "decode_error")


def test_decompression_bomb_is_refused_from_its_header(predict, ls, gemini):
    bomb = _png_bomb()
    assert len(bomb) < 200_000
    odd, lines = predict(upload(ls, "bomb.png", bomb))
    failed_alone(odd, lines, "bomb")
    assert "10000x10000 exceeds IMAGE_MAX_PIXELS" in lines
    assert len(gemini.calls) == 1  # only the good image was sent


def test_svg_is_refused_as_a_vector_format(predict, ls):
    svg = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
           b'<rect width="30" height="20" fill="red"/></svg>')
    odd, lines = predict(raw(ls, "pic.svg", svg, "image/svg+xml"))
    failed_alone(odd, lines, "unsupported_format")
    assert "SVG" in lines


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "image/jpeg"], ids=["as-html", "claiming-jpeg"])
def test_a_url_that_answers_html(predict, ls, content_type):
    page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form>...</form></body></html>"
    failed_alone(*predict(raw(ls, f"page-{content_type[:4]}", page, content_type)), "not_an_image")


def test_a_missing_upload(predict):
    failed_alone(*predict("/data/upload/7/not-there.png"), "not_found")


# --- images that must be handled ---------------------------------------------------------------------

def test_one_by_one_pixel(predict, ls, gemini):
    odd, lines = predict(upload(ls, "1x1.png", encode(Image.new("RGB", (1, 1), RED))))
    assert served(odd, lines) == []
    assert sorted(call.image_size for call in gemini.calls) == [(1, 1), (64, 48)]


def test_cmyk_jpeg(predict, ls):
    picture = car_picture((80, 60), (20, 12, 52, 40)).convert("CMYK")
    (region,) = served(*predict(upload(ls, "cmyk.jpg", encode(picture, "JPEG", quality=95))))
    assert_box(region, (20, 12, 52, 40), 80, 60)


def test_tiff(predict, ls):
    picture = car_picture((96, 48), (50, 4, 90, 30))
    (region,) = served(*predict(upload(ls, "car.tiff", encode(picture, "TIFF", compression="tiff_lzw"))))
    assert_box(region, (50, 4, 90, 30), 96, 48)


def test_grayscale(predict, ls, oracle, gemini):
    gray = Image.new("L", (80, 40), 200)
    ImageDraw.Draw(gray).rectangle([20, 10, 49, 29], fill=40)
    oracle.add(gray.convert("RGB"), [((20, 10, 50, 30), "Car")])
    (region,) = served(*predict(upload(ls, "gray.png", encode(gray))))
    assert_box(region, (20, 10, 50, 30), 80, 40)
    sent = next(c.image for c in gemini.calls if c.image_size == (80, 40))
    assert sent.mode == "RGB"


def test_16_bit_png(predict, ls, oracle, gemini):
    """16-bit grayscale (mode I;16): stretched to 8 bits, not clipped to white."""
    arr = np.full((60, 60), 1000, dtype=np.uint16)
    arr[20:50, 15:45] = 60000
    data = encode(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    expected = Image.new("RGB", (60, 60), (0, 0, 0))
    ImageDraw.Draw(expected).rectangle([15, 20, 44, 49], fill=(255, 255, 255))
    oracle.add(expected, [((15, 20, 45, 50), "Car")])
    (region,) = served(*predict(upload(ls, "16bit.png", data)))
    assert_box(region, (15, 20, 45, 50), 60, 60)
    sent = np.asarray(next(c.image for c in gemini.calls if c.image_size == (60, 60)).convert("L"))
    assert sent[35, 30] > 200 and sent[5, 5] < 50  # the object stayed bright, the background dark


# Stored pixels = displayed image transformed by the inverse of the EXIF orientation.
_INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_exif_rotated_boxes_land_on_the_image_as_shown(predict, ls, orientation):
    """Ground truth is drawn on the image as Label Studio shows it (48 x 72 portrait, car in the lower
    left); the file stores it rotated/flipped with an EXIF orientation tag. The Oracle finds the car in
    whatever pixels the backend sends, so only a correctly transposed image gives these coordinates."""
    box = (4, 44, 30, 66)
    shown = car_picture((48, 72), box)
    stored = shown.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif)
    # the fixture itself: a viewer that applies EXIF sees `shown` (checked with Pillow, not the backend)
    check = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert check.size == (48, 72) and np.abs(np.asarray(check, dtype=int)[55, 15] - RED).max() < 40
    (region,) = served(*predict(upload(ls, f"exif-{orientation}.jpg", data)))
    assert_box(region, box, 48, 72)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_uses_the_first_frame(predict, ls, fmt):
    frames = [car_picture((64, 64), (4, 4, 24, 20)), car_picture((64, 64), (36, 40, 60, 60)),
              car_picture((64, 64), (30, 2, 62, 12))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    animated = Image.open(io.BytesIO(data))
    assert getattr(animated, "n_frames", 1) == 3
    (region,) = served(*predict(upload(ls, f"anim.{fmt.lower()}", data)))
    assert_box(region, (4, 4, 24, 20), 64, 64)


def test_png_with_transparency_is_composited_not_black(predict, ls):
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))  # fully transparent black: white once composited
    ImageDraw.Draw(rgba).rectangle([10, 8, 41, 31], fill=RED + (255,))
    (region,) = served(*predict(upload(ls, "alpha.png", encode(rgba))))
    assert_box(region, CAR_BOX, 64, 48)


def test_a_batch_of_every_bad_image_at_once_keeps_order_and_serves_the_good_ones(app_factory, private_redis, ls, gemini):
    handle = app_factory(private_redis.url, gemini=gemini, ls=ls)
    bad = [upload(ls, "b1.jpg", b"garbage"), raw(ls, "b2.png", b"", "image/png"), upload(ls, "b3.png", _png_bomb(9000, 9000)),
           raw(ls, "b4.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"), "/data/upload/7/none.png"]
    urls = [u for pair in zip(bad, [GOOD] * len(bad)) for u in pair]
    response = handle.client.post("/predict", json=predict_body([task(i, u) for i, u in enumerate(urls)]))
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == len(urls)
    for i, prediction in enumerate(results):
        if i % 2:
            (region,) = prediction["result"]
            assert_box(region, CAR_BOX, 64, 48)
        else:
            assert prediction["result"] == []
