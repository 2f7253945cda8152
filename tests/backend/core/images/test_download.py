"""Downloads: redirects (each hop judged on its own: allowlist, addresses, token), HTTP errors, timeouts."""

from __future__ import annotations

import socket
import time

import pytest

from tests.backend.core.images.helpers import LEGACY, encode, reason_of, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


def test_ls_media_redirect_to_an_allowed_foreign_host_drops_authorization(make_loader, ls, foreign):
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    ls.auth = {f"Token {LEGACY}"}
    ls.redirects["/data/upload/1/moved.png"] = f"{foreign.url}/a.png"
    assert make_loader(image_allowed_hosts="127.0.0.2").load("/data/upload/1/moved.png").width == 40
    assert ls.auth_headers() == [f"Token {LEGACY}"]
    assert foreign.auth_headers() == [None]


def test_ls_media_redirect_does_not_vouch_for_a_foreign_host(make_loader, ls, foreign, connections):
    """A hop is judged on its own: Label Studio redirecting somewhere does not put that host on
    IMAGE_ALLOWED_HOSTS (it did before: "LS chose it")."""
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    ls.redirects["/data/upload/1/moved.png"] = f"{foreign.url}/a.png"
    assert reason_of(make_loader(image_allowed_hosts=""), "/data/upload/1/moved.png") == "forbidden_url"
    assert foreign.requests == [] and {a[0] for a in connections} == {"127.0.0.1"}
    assert reason_of(make_loader(image_allowed_hosts="other.example"), "/data/upload/1/moved.png") == "forbidden_url"
    assert foreign.requests == []


def test_ls_media_redirect_to_an_ls_api_path_carries_no_token(make_loader, ls):
    """Label Studio itself redirecting from a media path to its API: the API hop gets no token,
    whatever the spelling of the path."""
    ls.files["/api/users"] = (encode(red_blue()), "image/png")  # an open LS, to see every header
    ls.redirects["/data/upload/1/to-api.png"] = "/api/users"
    ls.redirects["/data/upload/1/to-api-dots.png"] = "/data/upload/1/../../../api/users"
    ls.redirects["/data/upload/1/to-api-encoded.png"] = "/data/upload/%2e%2e/%2e%2e/api/users"
    loader = make_loader(label_studio_api_key=LEGACY)
    assert loader.load("/data/upload/1/to-api.png").width == 40
    assert loader.load("/data/upload/1/to-api-dots.png").width == 40
    # requests decodes %2e (unreserved) and sends a literal "..", which a proxy in front of LS would
    # resolve to /api/users; this server does not, hence 404, but the hop carried no token either way
    assert reason_of(loader, "/data/upload/1/to-api-encoded.png") == "not_found"
    assert [(p, h.get("Authorization")) for _, p, h in ls.requests] == [
        ("/data/upload/1/to-api.png", f"Token {LEGACY}"), ("/api/users", None),
        ("/data/upload/1/to-api-dots.png", f"Token {LEGACY}"), ("/api/users", None),
        ("/data/upload/1/to-api-encoded.png", f"Token {LEGACY}"), ("/data/upload/../../api/users", None)]


def test_ls_api_redirect_to_a_media_path_gets_the_token_on_that_hop_only(make_loader, ls):
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    ls.redirects["/api/go"] = "/data/upload/1/a.png"
    assert make_loader(label_studio_api_key=LEGACY).load("/api/go").width == 40
    assert ls.auth_headers() == [None, f"Token {LEGACY}"]


def test_storage_hosts_by_wildcard(make_loader, ls, foreign, monkeypatch):
    """Presigned storage URLs need their host allowed; '*.example.com' allows its subdomains only."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host.endswith(".test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    port = foreign.url.rsplit(":", 1)[1]
    loader = make_loader(image_allowed_hosts="*.storage.test")
    assert loader.load(f"http://bucket.storage.test:{port}/a.png").width == 40
    for host in ("storage.test", "evilstorage.test", "storage.test.evil.test"):
        assert reason_of(loader, f"http://{host}:{port}/a.png") == "forbidden_url", host
    ls.redirects["/data/upload/1/s3.png"] = f"http://bucket.storage.test:{port}/a.png"
    assert loader.load("/data/upload/1/s3.png").width == 40
    assert foreign.auth_headers() == [None, None]


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
