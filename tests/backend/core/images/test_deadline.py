"""One wall-clock deadline per image: a server that drips its answer (1 byte / 0.2 s, which no
per-read timeout ever trips) is cut at IMAGE_FETCH_TIMEOUT, headers, body or behind a redirect.

Waits are bounded (the fetch must have ended by deadline + margin), not timed: on a busy machine
the margin is generous, and without the deadline the fetch would last for hours.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import warnings

import pytest

from backend.core.images import ImageError
from tests.backend.core.images.helpers import DripServer, TLSDripServer, encode, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")

DEADLINE = 1.0
MARGIN = 5.0
NO_KEY = ""  # no token: the SDK's first import (seconds on a busy machine) must not eat the 1 s deadline


@pytest.fixture
def drip():
    server = DripServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def foreign_drip():
    server = DripServer("127.0.0.2")
    yield server
    server.close()


def fetch_error(loader, url: str) -> ImageError:
    """Load ``url`` on a thread; it must end within DEADLINE + MARGIN, with an ImageError."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["image"] = loader.load(url)
        except ImageError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE + MARGIN)
    assert not thread.is_alive(), f"the fetch of {url} outlived its {DEADLINE} s deadline"
    assert "error" in outcome, outcome
    return outcome["error"]  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["body", "no_length", "headers"])
def test_a_dripping_label_studio_is_cut_at_the_deadline(make_loader, drip, mode):
    drip.mode = mode
    loader = make_loader(label_studio_url=drip.url, label_studio_api_key=NO_KEY, image_fetch_timeout=DEADLINE)
    error = fetch_error(loader, "/data/upload/1/drip.png")
    assert error.reason == "timeout", error
    assert "IMAGE_FETCH_TIMEOUT" in error.message
    assert drip.started.is_set()
    assert drip.ended.wait(MARGIN), "the dripping connection was left open after the deadline"


def test_the_deadline_spans_redirects(make_loader, ls, foreign_drip):
    """Label Studio redirects to a dripping storage host: one deadline for both hops."""
    ls.redirects["/data/upload/1/moved.png"] = f"{foreign_drip.url}/bucket/drip.png"
    loader = make_loader(image_allowed_hosts="127.0.0.2", label_studio_api_key=NO_KEY, image_fetch_timeout=DEADLINE)
    error = fetch_error(loader, "/data/upload/1/moved.png")
    assert error.reason == "timeout", error
    assert foreign_drip.started.is_set() and [p for _, p, _ in ls.requests] == ["/data/upload/1/moved.png"]


def test_a_tls_handshake_that_drips_is_cut_at_the_deadline(make_loader):
    """An https storage host that never finishes its handshake (one byte / 0.2 s of a 16 KB record).

    Two guards cut it: CPython applies a socket's timeout to the whole handshake (not per read), and
    the deadline shuts the socket. With the deadline's watcher disabled this still passes (checked):
    the test guards the outcome, whichever of the two delivers it."""
    server = TLSDripServer("127.0.0.2")
    try:
        loader = make_loader(image_allowed_hosts="127.0.0.2", label_studio_api_key=NO_KEY, image_fetch_timeout=DEADLINE)
        error = fetch_error(loader, f"{server.url}/bucket/drip.png")
        assert error.reason == "timeout", error
        assert server.started.is_set(), "the handshake never began"
        assert server.ended.wait(MARGIN), "the dripping handshake was left open after the deadline"
    finally:
        server.close()


def test_a_dns_lookup_that_hangs_is_cut_at_the_deadline(make_loader, monkeypatch):
    """getaddrinfo cannot be interrupted: the fetch stops waiting for it at the deadline."""
    release = threading.Event()
    real = socket.getaddrinfo

    def hung_resolver(host, *args, **kwargs):
        if host == "hung-dns.example":
            release.wait(60)
            raise socket.gaierror("released by the test")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hung_resolver)
    try:
        loader = make_loader(image_allowed_hosts="hung-dns.example", label_studio_api_key=NO_KEY,
                             image_fetch_timeout=DEADLINE)
        error = fetch_error(loader, "http://hung-dns.example/bucket/a.png")
        assert error.reason == "timeout", error
    finally:
        release.set()


def test_fetches_within_the_deadline_leave_no_descriptor_behind(make_loader, ls):
    """The watchdog's duplicate descriptors are closed with each fetch, not left to the garbage
    collector (which would close them late, with a ResourceWarning)."""
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    loader = make_loader(label_studio_api_key=NO_KEY)
    loader._cache = None  # every load goes to the network
    loader.load("/data/upload/1/a.png")
    gc.collect()  # earlier tests' garbage is not this test's business
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(30):
            assert loader.load("/data/upload/1/a.png").width == 40
        gc.collect()
    to_ls = f"raddr=('127.0.0.1', {ls.httpd.server_address[1]})"
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and to_ls in str(w.message)] == []
    assert len(os.listdir("/proc/self/fd")) <= before + 3
