"""Hostile image URLs through POST /predict: nothing forbidden is fetched, no credential leaves.

Task data is written by whoever can import tasks, so every URL here is an attempt to make the backend
read a local file, reach the cloud metadata service or Redis, or hand Label Studio's token to another
host. Each sits in a batch beside a good task (which is still served); each is refused with
``forbidden_url`` (or served without credentials, for an allowed foreign host); the target servers
record nothing, no connection is even opened to a forbidden address, and no token appears in any
foreign request or log. Label Studio's token goes only to its media paths (never to ``/api/...``,
however the path is spelled), and a server that drips its answer is cut at the per-image deadline.

127.0.0.2 plays a public internet host (``ssrf.is_public`` is patched for it, as in
tests/backend/core/images/test_ssrf.py, whose loader-level SSRF cases are not repeated here).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flask import redirect

from backend.core.images import loader as image_loader
from tests import fake_gemini as fg
from tests.adversarial import CAR_BOX, RED, assert_box, car_picture, encode, predict_body, task
from tests.backend.core.images.helpers import DripServer, FakeServer
from tests.fake_label_studio import FakeLabelStudio
from tests.live import wait_for

GOOD = "/data/upload/7/good-car.png"
GOOD_ID, BAD_ID = 1, 666


class Trap:
    """A loopback HTTP server that records every request (headers included) and a raw TCP count."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, dict]] = []
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                trap.hits.append((self.path, dict(self.headers)))
                body = encode(car_picture())
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def trap():
    server = Trap()
    yield server
    server.close()


@pytest.fixture(scope="module")
def foreign():
    server = FakeServer("127.0.0.2")
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="module")
def ls():
    """Fake Label Studio whose media path ``/data/upload/go/<name>`` answers 302 to ``targets[name]``
    (a hostile redirect, with Label Studio's token on the first hop)."""
    fake = FakeLabelStudio()
    fake.targets = {}

    @fake.app.get("/data/upload/go/<name>")
    def go(name):
        return redirect(fake.targets[name], code=302)

    fake.files[GOOD] = encode(car_picture())
    with fake:
        yield fake


@pytest.fixture(scope="module")
def gemini():
    with fg.FakeGemini(responder=fg.Oracle(colors={"Car": RED})) as fake:
        yield fake


# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


@pytest.fixture
def local_root(tmp_path):
    """LOCAL_FILES_DOCUMENT_ROOT with one good image; a secret image and text outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "car.png").write_bytes(encode(car_picture()))
    (outside / "secret.png").write_bytes(encode(car_picture()))
    (outside / "passwords.txt").write_text("root:x:0:0:secret")
    os.symlink(outside / "secret.png", root / "images" / "link.png")
    os.symlink(outside, root / "escape")
    return root, outside


@pytest.fixture
def make_predict(app_factory, private_redis, ls, gemini, foreign, trap, local_root, caplog):
    """``make_predict(**settings)`` -> ``predict(url, good=GOOD)``: a batch of the URL under test and
    a good task, through the real app; returns the odd task's prediction and its log lines."""
    root, _ = local_root
    caplog.set_level(logging.DEBUG)

    def make(**settings):
        values = {"image_allowed_hosts": "127.0.0.2", "local_files_document_root": str(root), **settings}
        return _predictor(app_factory(private_redis.url, gemini=gemini, ls=ls, **values), caplog)

    return make


@pytest.fixture
def predict(make_predict):
    return make_predict()


def _predictor(handle, caplog):
    def run(url: str, good: str = GOOD) -> tuple[dict, str]:
        caplog.clear()
        response = handle.client.post("/predict", json=predict_body([task(BAD_ID, url), task(GOOD_ID, good)]))
        assert response.status_code == 200, response.get_data()
        odd, good_prediction = response.json["results"]
        (region,) = good_prediction["result"]
        assert_box(region, CAR_BOX, 64, 48)
        lines = "\n".join(r.getMessage() for r in caplog.records if f"task {BAD_ID}:" in r.getMessage())
        return odd, lines

    run.handle = handle
    return run


def refused(odd: dict, lines: str, reason: str = "forbidden_url") -> None:
    assert odd["result"] == [] and odd["score"] == 0.0
    assert f"task {BAD_ID}: empty prediction (image {reason}:" in lines, lines


def _tokens(ls: FakeLabelStudio) -> list[str]:
    return [ls.pat, ls.legacy_token, *ls._access_tokens]


# --- local files and schemes -----------------------------------------------------------------------

@pytest.mark.parametrize("url", ["file:///etc/passwd", "file://localhost/etc/passwd", "FILE:///etc/passwd",
                                 "gopher://127.0.0.1:6379/_INFO", "ftp://127.0.0.2/a.png", "dict://127.0.0.1:6379/info",
                                 "etc/passwd", "jar:file:///etc/passwd!/", "\\\\server\\share\\a.png"])
def test_file_and_other_schemes(predict, ls, connections, url):
    odd, lines = predict(url)
    refused(odd, lines)
    assert set(connections) <= {("127.0.0.1", ls.port)}  # the good task's upload, nothing else


def test_an_absolute_path_is_a_label_studio_path_never_a_local_file(predict, ls, monkeypatch):
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(image_loader.os, "open", lambda path, *a, **k: opened.append(os.fspath(path)) or real_open(path, *a, **k))
    before = len(ls.requests_log)
    refused(*predict("/etc/passwd"), reason="http_error")  # not a media path: fetched without the token, 401
    assert [(r["path"], r["authorization"]) for r in ls.requests_log[before:] if r["path"] == "/etc/passwd"] == \
        [("/etc/passwd", None)]
    assert "/etc/passwd" not in opened


@pytest.mark.parametrize("rel", ["../outside/secret.png", "images/../../outside/secret.png", "%2e%2e/outside/secret.png",
                                 "..%2Foutside%2Fsecret.png", "/etc/passwd", "images/link.png", "escape/passwords.txt",
                                 "images/%00.png", "....//outside/secret.png"])
def test_dot_dot_and_symlinks_in_local_files_paths_open_nothing_outside_the_root(predict, local_root, monkeypatch, rel):
    _, outside = local_root
    opened: list[str] = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(image_loader.os, "open", spy)
    odd, lines = predict(f"/data/local-files/?d={rel}", good="/data/local-files/?d=images/car.png")
    assert odd["result"] == []
    assert "forbidden_url" in lines or "not_found" in lines, lines
    assert not [p for p in opened if p.startswith((str(outside), "/etc"))], opened
    assert any(p.endswith("images/car.png") for p in opened)  # the good task was read from the root


# --- private addresses -----------------------------------------------------------------------------

def test_cloud_metadata_address(predict, connections):
    for url in ("http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                "http://[::ffff:169.254.169.254]/latest/", "http://169.254.169.254.nip.io/", "http://metadata.google.internal/"):
        odd, lines = predict(url)
        refused(odd, lines)
    assert not [a for a in connections if a[0].startswith("169.254") or "metadata" in a[0]]


def test_redis_on_loopback_is_never_spoken_to(predict, private_redis, connections):
    """HTTP sent to Redis shows in Redis's own log: it drops a client that sends ``Host:`` with
    "Possible SECURITY ATTACK detected" (checked at the end to work, by sending one ourselves)."""
    for url in (f"http://127.0.0.1:{private_redis.port}/", f"http://localhost:{private_redis.port}/",
                f"http://[::1]:{private_redis.port}/", f"http://0.0.0.0:{private_redis.port}/",
                f"http://2130706433:{private_redis.port}/", "http://127.0.0.1:6379/", "http://127.1:6379/"):
        odd, lines = predict(url)
        refused(odd, lines)
    assert not [a for a in connections if a[1] in (6379, private_redis.port)]
    assert "SECURITY ATTACK" not in private_redis.log_path.read_text()
    # the detector works: a real HTTP request to this Redis is logged
    with socket.create_connection(("127.0.0.1", private_redis.port), timeout=2) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{private_redis.port}\r\n\r\n".encode())
        try:
            while sock.recv(1024):
                pass
        except OSError:
            pass
    assert wait_for(lambda: "SECURITY ATTACK" in private_redis.log_path.read_text(), timeout=5)


def test_other_loopback_services_record_nothing(predict, trap, connections):
    trap.hits.clear()
    for url in (f"http://127.0.0.1:{trap.port}/car.png", f"http://localhost:{trap.port}/car.png",
                f"http://127.0.0.3:{trap.port}/car.png", f"http://10.0.0.1:{trap.port}/", "http://192.168.1.1/"):
        refused(*predict(url))
    assert trap.hits == []
    assert not [a for a in connections if a[1] == trap.port]


@pytest.mark.parametrize("target", ["trap", "metadata", "redis", "file"])
def test_a_redirect_to_a_private_address_is_not_followed(predict, ls, trap, private_redis, connections, target):
    trap.hits.clear()
    ls.targets[target] = {"trap": f"http://127.0.0.1:{trap.port}/car.png", "metadata": "http://169.254.169.254/latest/meta-data/",
                          "redis": f"http://127.0.0.1:{private_redis.port}/", "file": "file:///etc/passwd"}[target]
    refused(*predict(f"/data/upload/go/{target}"))
    assert trap.hits == []
    assert {a[1] for a in connections} <= {ls.port}, connections  # only Label Studio itself was contacted


def test_a_redirect_chain_through_an_allowed_host_to_a_private_address(predict, foreign, trap, connections):
    trap.hits.clear()
    foreign.redirects["/hop"] = f"http://127.0.0.1:{trap.port}/car.png"
    refused(*predict(f"{foreign.url}/hop"))
    assert trap.hits == []
    assert {a[0] for a in connections} <= {"127.0.0.1", "127.0.0.2"} and not [a for a in connections if a[1] == trap.port]


# --- Label Studio credentials ----------------------------------------------------------------------

def test_label_studio_credentials_never_reach_another_host(predict, ls, foreign, trap, caplog):
    foreign.reset()
    trap.hits.clear()
    foreign.files["/car.png"] = (encode(car_picture()), "image/png")
    foreign.redirects["/back-to-ls"] = f"{ls.url}{GOOD}"
    ls.targets["to-foreign"] = f"{foreign.url}/car.png"
    ls_port = ls.port

    # an allowed foreign host is served, without credentials
    odd, _ = predict(f"{foreign.url}/car.png")
    assert_box(odd["result"][0], CAR_BOX, 64, 48)
    # Label Studio redirecting to it: followed, credentials dropped at the hop
    odd, _ = predict("/data/upload/go/to-foreign")
    assert_box(odd["result"][0], CAR_BOX, 64, 48)
    # the foreign host sending us back to Label Studio: no credentials on the way back either
    before = len(ls.requests_log)
    refused(*predict(f"{foreign.url}/back-to-ls"), reason="http_error")
    back = [r for r in ls.requests_log[before:] if r["path"] == GOOD]
    assert back and back[0]["authorization"] is None
    # look-alikes of the Label Studio origin
    for url in (f"http://127.0.0.1:{ls_port}@127.0.0.2:{foreign.httpd.server_address[1]}/car.png",
                f"http://user:{ls.pat}@127.0.0.2:{foreign.httpd.server_address[1]}/car.png",
                f"http://127.0.0.1:{trap.port}/data/upload/7/good-car.png",
                f"https://127.0.0.1:{ls_port}/data/upload/7/good-car.png"):
        odd, _ = predict(url)
        assert odd["result"] == [], url
    assert trap.hits == []
    assert [h.get("Authorization") for _, _, h in foreign.requests] == [None] * len(foreign.requests)
    assert len(foreign.requests) == 3  # car, car via LS redirect, back-to-ls; nothing else got there
    tokens = _tokens(ls)
    recorded = repr(foreign.requests) + repr(trap.hits)
    assert all(token not in recorded for token in tokens)
    assert all(token not in caplog.text for token in tokens)


# --- Label Studio's token only on its media paths; one deadline per image ---------------------------

API_PATHS = ["/api/users", "/api/projects", "/api/current-user/whoami", "/data/upload/../../api/users",
             "/data/upload/%2e%2e/%2e%2e/api/users", "/data/upload/%252e%252e/%252e%252e/api/users",
             "/data/upload//..//api/users", "/data/upload/..;/..;/api/users", "/tasks/1/presign/../../../api/projects"]


def test_label_studio_api_paths_are_fetched_without_the_token(predict, ls):
    """Task data naming Label Studio's API (plainly or behind dot segments, encoded once or twice)
    gets an anonymous GET, which Label Studio refuses: the token goes to media paths only."""
    before = len(ls.requests_log)
    for path in [*API_PATHS, f"{ls.url}/api/users"]:
        odd, lines = predict(path)
        assert odd["result"] == [] and ("http_error" in lines or "not_found" in lines), (path, lines)
    gets = [r for r in ls.requests_log[before:] if r["method"] == "GET"]
    media = [r for r in gets if r["path"] == GOOD]
    others = [r for r in gets if r["path"] != GOOD]
    assert media and all(r["authorization"] for r in media), "the good upload still gets the token"
    assert len(others) == len(API_PATHS) + 1, others
    assert [r for r in others if r["authorization"] is not None] == []


def test_a_redirect_from_a_media_path_to_the_api_drops_the_token(predict, ls):
    ls.targets["api"] = "/api/projects"
    before = len(ls.requests_log)
    refused(*predict("/data/upload/go/api"), reason="http_error")
    hops = [(r["path"], r["authorization"] is not None) for r in ls.requests_log[before:]
            if r["path"] in ("/data/upload/go/api", "/api/projects")]
    assert hops == [("/data/upload/go/api", True), ("/api/projects", False)]


def test_a_dripping_image_fails_its_task_at_the_deadline_and_the_rest_is_served(make_predict):
    """1 byte / 0.2 s never trips a per-read timeout; the per-image deadline (1 s here) cuts it.
    A bounded wait, not a timing assertion: the request must be answered long before the drip ends."""
    drip = DripServer("127.0.0.2")
    try:
        predict = make_predict(image_fetch_timeout=1.0)
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=predict(f"{drip.url}/drip.png")), daemon=True)
        thread.start()
        thread.join(1.0 + 10.0)
        assert not thread.is_alive(), "/predict waited on the dripping image past its deadline"
        refused(*outcome["result"], reason="timeout")
        assert drip.started.is_set() and drip.ended.wait(5), "the dripping connection was left open"
    finally:
        drip.close()
