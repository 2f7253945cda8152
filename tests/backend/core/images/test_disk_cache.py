"""The on-disk cache of Label Studio uploads."""

from __future__ import annotations

import pytest
from PIL import Image

from backend.core.images.disk_cache import UploadCache
from tests.backend.core.images.helpers import close, encode, reason_of

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


def test_upload_cache_is_per_ls_host(make_loader, ls, foreign, tmp_path):
    ls.files["/data/upload/1/a.png"] = (encode(Image.new("RGB", (10, 10), (255, 0, 0))), "image/png")
    foreign.files["/data/upload/1/a.png"] = (encode(Image.new("RGB", (10, 10), (0, 0, 255))), "image/png")
    first = make_loader().load("/data/upload/1/a.png")
    second = make_loader().load("/data/upload/1/a.png")
    assert second.sha256 == first.sha256 and len(ls.requests) == 1
    assert len(list((tmp_path / "data" / "images").iterdir())) == 1
    other = make_loader(label_studio_url=foreign.url).load("/data/upload/1/a.png")
    assert close(other.image.getpixel((0, 0)), (0, 0, 255)) and len(foreign.requests) == 1
    # Errors are not cached; non-upload LS paths are not cached.
    ls.files["/data/upload/1/page"] = (b"<html></html>", "text/html")
    for _ in range(2):
        reason_of(make_loader(), "/data/upload/1/page")
    assert len(list((tmp_path / "data" / "images").iterdir())) == 2


def test_cache_round_trip_key_and_size_limit(tmp_path):
    cache = UploadCache(tmp_path / "images", max_bytes=10)
    url = "http://ls:8080/data/upload/1/a.png"
    assert cache.read(url) is None
    cache.write(url, b"12345")
    assert cache.read(url) == b"12345"
    assert cache.read("http://other:8080/data/upload/1/a.png") is None, "the key is the absolute URL"
    cache.write("http://ls:8080/big", b"x" * 11)
    assert cache.read("http://ls:8080/big") is None, "an entry over the limit is a miss"
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")], "no temp file left"


def test_cache_write_failure_is_not_an_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    cache = UploadCache(tmp_path / "file" / "images", max_bytes=10)  # its folder cannot be created
    cache.write("http://ls:8080/a", b"1")
    assert cache.read("http://ls:8080/a") is None
