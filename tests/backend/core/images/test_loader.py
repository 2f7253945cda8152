"""URL resolution: cloud presign, local-files root, data: URLs, size limits on every source."""

from __future__ import annotations

import base64
import hashlib
import os
import random

import pytest
from PIL import Image

from tests.backend.core.images.helpers import LEGACY, PAT, encode, reason_of, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


def test_presign_cloud_uri(make_loader, ls, foreign, connections):
    foreign.files["/bucket/key.png"] = (encode(red_blue()), "image/png")
    ls.auth = set()
    ls.presign_location = lambda uri: f"{foreign.url}/bucket/key.png?X-Amz-Signature=deadbeef"
    refusing = make_loader(label_studio_api_key=PAT, image_allowed_hosts="")  # the storage host must be allowed
    assert reason_of(refusing, "s3://bucket/key.png", task_id=7) == "forbidden_url" and foreign.requests == []
    ls.presigned.clear()
    loader = make_loader(label_studio_api_key=PAT, image_allowed_hosts="127.0.0.2")
    assert loader.load("s3://bucket/key.png", task_id=7).width == 40
    assert ls.presigned == ["s3://bucket/key.png"]
    assert any(p.startswith("/tasks/7/presign/?fileuri=") for _, p, _ in ls.requests)
    assert foreign.auth_headers() == [None]
    n = len(connections)
    for uri in ("s3://bucket/key.png", "gs://b/k.jpg", "azure-blob://c/k.jpg"):
        assert reason_of(loader, uri) == "forbidden_url"  # no task id
    assert len(connections) == n


def test_local_files_under_document_root(make_loader, ls, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "a b.png").write_bytes(encode(red_blue()))
    (outside / "secret.png").write_bytes(encode(red_blue()))
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    os.symlink("/etc/passwd", root / "passwd")
    loader = make_loader(local_files_document_root=str(root))
    assert loader.load("/data/local-files/?d=images/a%20b.png").width == 40
    assert loader.load(f"{ls.url}/data/local-files/?d=images/a+b.png").width == 40
    for rel in ("../outside/secret.png", "images/../../outside/secret.png", "/etc/passwd",
                str(outside / "secret.png"), "link.png", "linkdir/secret.png", "passwd", ""):
        assert reason_of(loader, f"/data/local-files/?d={rel}") == "forbidden_url", rel
    assert reason_of(loader, "/data/local-files/?d=images/missing.png") == "not_found"
    os.mkfifo(root / "pipe.png")  # must not block the worker
    assert reason_of(loader, "/data/local-files/?d=pipe.png") == "not_found"
    assert reason_of(loader, "/data/local-files/?d=images") == "not_found"
    assert ls.requests == [], "served from disk, not from Label Studio"


def test_local_files_without_root_go_through_ls(make_loader, ls):
    ls.auth = {f"Token {LEGACY}"}
    ls.files["/data/local-files/?d=images/a.png"] = (encode(red_blue()), "image/png")
    assert make_loader().load("/data/local-files/?d=images/a.png").width == 40
    assert ls.auth_headers() == [f"Token {LEGACY}"]


def test_too_large(make_loader, ls, tmp_path):
    noise = encode(Image.frombytes("L", (100, 100), random.Random(1).randbytes(10000)))
    ls.files["/data/upload/1/big.png"] = (noise, "image/png")
    ls.files["/data/upload/1/stream.png"] = (noise, "image/png")
    ls.no_length.add("/data/upload/1/stream.png")
    loader = make_loader(image_max_bytes=2000)
    assert reason_of(loader, "/data/upload/1/big.png") == "too_large"
    assert reason_of(loader, "/data/upload/1/stream.png") == "too_large"
    assert reason_of(loader, "data:image/png;base64," + base64.b64encode(noise).decode()) == "too_large"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "big.png").write_bytes(noise)
    local = make_loader(image_max_bytes=2000, local_files_document_root=str(tmp_path / "root"))
    assert reason_of(local, "/data/local-files/?d=big.png") == "too_large"


def test_data_url(make_loader):
    data = encode(red_blue())
    loaded = make_loader().load("data:image/png;base64," + base64.b64encode(data).decode())
    assert loaded.width == 40 and loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert reason_of(make_loader(), "data:text/html;base64,PGh0bWw+") == "not_an_image"
    assert reason_of(make_loader(), "data:image/png,rawbytes") == "decode_error"
