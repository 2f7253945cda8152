"""The on-disk cache of Label Studio uploads."""

from __future__ import annotations

import os

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


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_cache_folder_stays_under_its_limit_for_10000_urls(tmp_path):
    folder = tmp_path / "images"
    cache = UploadCache(folder, max_bytes=4096, max_total_bytes=100 * 1024)
    for i in range(10_000):
        cache.write(f"http://ls:8080/data/upload/1/{i}.png", bytes([i % 256]) * 1024)
        if i % 500 == 0:
            assert _folder_bytes(folder) <= 100 * 1024
    assert _folder_bytes(folder) <= 100 * 1024 and len(list(folder.iterdir())) <= 100
    assert cache.read("http://ls:8080/data/upload/1/0.png") is None, "the oldest was evicted"


def test_eviction_drops_the_least_recently_used_first(tmp_path):
    folder = tmp_path / "images"
    cache = UploadCache(folder, max_bytes=1000, max_total_bytes=10_000)
    urls = [f"http://ls:8080/data/upload/1/{i}.png" for i in range(10)]
    for i, url in enumerate(urls):
        cache.write(url, b"x" * 1000)
        os.utime(cache._path(url), ns=(i * 10**9, i * 10**9))  # written one second apart, oldest first
    assert cache.read(urls[0]) is not None  # a hit: now the most recently used
    cache.write("http://ls:8080/data/upload/1/new.png", b"y" * 1000)  # 11,000 bytes > 10,000: evict to 9,000
    kept = [url for url in urls if cache._path(url).exists()]
    assert kept == [urls[0], *urls[3:]], "the two least recently used went, not the one just read"
    assert _folder_bytes(folder) <= 9_000


def test_an_overfull_folder_from_an_earlier_run_is_pruned_on_the_first_write(tmp_path):
    folder = tmp_path / "images"
    old = UploadCache(folder, max_bytes=1000, max_total_bytes=10**9)
    for i in range(50):
        old.write(f"http://ls:8080/data/upload/1/{i}.png", b"z" * 1000)
        os.utime(old._path(f"http://ls:8080/data/upload/1/{i}.png"), ns=(i * 10**9, i * 10**9))
    cache = UploadCache(folder, max_bytes=1000, max_total_bytes=10_000)  # a restart with a smaller limit
    cache.write("http://ls:8080/data/upload/1/new.png", b"n" * 1000)
    assert _folder_bytes(folder) <= 10_000 and cache.read("http://ls:8080/data/upload/1/new.png") == b"n" * 1000
