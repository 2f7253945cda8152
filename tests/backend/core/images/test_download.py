"""Downloads: redirects (credentials only on the Label Studio chain), HTTP errors, timeouts."""

from __future__ import annotations

import time

import pytest

from tests.backend.core.images.helpers import LEGACY, encode, reason_of, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


def test_ls_redirect_to_foreign_host_drops_authorization(make_loader, ls, foreign):
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    ls.auth = {f"Token {LEGACY}"}
    ls.redirects["/data/upload/1/moved.png"] = f"{foreign.url}/a.png"
    assert make_loader(image_allowed_hosts="").load("/data/upload/1/moved.png").width == 40
    assert ls.auth_headers() == [f"Token {LEGACY}"]
    assert foreign.auth_headers() == [None]


def test_foreign_redirect_back_to_ls_carries_no_credentials(make_loader, ls, foreign):
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    foreign.redirects["/to-ls"] = f"{ls.url}/data/upload/1/a.png"
    assert make_loader().load(f"{foreign.url}/to-ls").width == 40
    assert ls.auth_headers() == [None]


def test_ls_chain_may_hop_twice_without_allowlist(make_loader, ls, foreign):
    """LS -> storage -> storage's regional endpoint (S3 307): LS chose it, the allowlist is not
    needed, the address check and the no-credentials rule still apply."""
    foreign.files["/regional/a.png"] = (encode(red_blue()), "image/png")
    foreign.redirects["/global/a.png"] = "/regional/a.png"
    ls.redirects["/data/upload/1/a.png"] = f"{foreign.url}/global/a.png"
    assert make_loader(image_allowed_hosts="").load("/data/upload/1/a.png").width == 40
    assert foreign.auth_headers() == [None, None]
    foreign.redirects["/global/b.png"] = "http://127.0.0.1:6379/"
    ls.redirects["/data/upload/1/b.png"] = f"{foreign.url}/global/b.png"
    assert reason_of(make_loader(image_allowed_hosts=""), "/data/upload/1/b.png") == "forbidden_url"


def test_http_errors(make_loader, ls):
    ls.redirects.update({f"/loop{i}": f"/loop{i + 1}" for i in range(10)})
    loader = make_loader()
    assert reason_of(loader, "/data/upload/1/missing.png") == "not_found"
    assert reason_of(loader, "/loop0") == "http_error"
    assert reason_of(make_loader(label_studio_url="http://127.0.0.1:1"), "/data/upload/1/a.png") == "http_error"


def test_timeout(make_loader, ls):
    ls.files["/data/upload/1/slow.png"] = (encode(red_blue()), "image/png")
    ls.delays["/data/upload/1/slow.png"] = 1.5
    start = time.monotonic()
    assert reason_of(make_loader(image_fetch_timeout=0.3), "/data/upload/1/slow.png") == "timeout"
    assert time.monotonic() - start < 1.2
