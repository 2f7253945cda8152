"""ImageLoader against real HTTP servers on loopback.

Two servers: "Label Studio" on 127.0.0.1 and a "foreign host" on 127.0.0.2. The loader refuses
loopback addresses, so these tests treat 127.0.0.2 as if it were a public internet address
(``public_foreign`` patches the address classifier); everything on 127.0.0.1 other than the
Label Studio port stays private, as do 169.254.169.254, ::1, localhost.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import socket
import ssl
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
import numpy as np
import pytest
from PIL import Image, ImageFile

from backend.core import images
from backend.core.images import ImageError, ImageLoader, decode_image
from backend.core.settings import Settings

SECRET = "test-signing-key-0123456789abcdef0123"
LEGACY = "legacy0123456789abcdef0123456789abcdef"
PAT = jwt.encode({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-1", "user_id": 1},
                 SECRET, algorithm="HS256")


# --- fake servers -----------------------------------------------------------------------------

class FakeServer:
    """A threaded HTTP server with per-test routes; records every request with its headers."""

    def __init__(self, host: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.handle_get(self)

            def do_POST(self) -> None:
                server.handle_post(self)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        self.redirects: dict[str, str] = {}
        self.delays: dict[str, float] = {}
        self.no_length: set[str] = set()
        self.auth: set[str] | None = None  # accepted Authorization values; None = open
        self.refreshes = 0
        self.presigned: list[str] = []
        self.presign_location = lambda uri: "/nowhere"

    def auth_headers(self) -> list[str | None]:
        return [h.get("Authorization") for _, _, h in self.requests]

    def handle_post(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        self.requests.append(("POST", h.path, dict(h.headers)))
        if h.path != "/api/token/refresh/":
            return self.send(h, 404, b"", "text/plain")
        if json.loads(body).get("refresh") != PAT:
            return self.send(h, 401, b'{"detail": "Token is invalid or expired"}', "application/json")
        self.refreshes += 1
        access = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300, "jti": f"a{self.refreshes}"},
                            SECRET, algorithm="HS256")
        if self.auth is not None:
            self.auth.add(f"Bearer {access}")
        self.send(h, 200, json.dumps({"access": access}).encode(), "application/json")

    def handle_get(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append(("GET", h.path, dict(h.headers)))
        parts = urlsplit(h.path)
        route = parts.path
        if self.auth is not None and h.headers.get("Authorization") not in self.auth:
            return self.send(h, 401, b'{"detail": "Authentication credentials were not provided."}', "application/json")
        if route.startswith("/tasks/") and route.endswith("/presign/"):
            fileuri = parse_qs(parts.query)["fileuri"][0]
            uri = base64.urlsafe_b64decode(fileuri + "=" * (-len(fileuri) % 4)).decode()
            self.presigned.append(uri)
            return self.send(h, 303, b"", "text/plain", {"Location": self.presign_location(uri)})
        target = self.redirects.get(h.path) or self.redirects.get(route)
        if target:
            return self.send(h, 302, b"", "text/plain", {"Location": target})
        if route in self.delays:
            time.sleep(self.delays[route])
        found = self.files.get(h.path) or self.files.get(route)
        if found is None:
            return self.send(h, 404, b"<html>not found</html>", "text/html")
        self.send(h, 200, found[0], found[1], length=route not in self.no_length)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str,
             headers: dict[str, str] | None = None, length: bool = True) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            if length:
                h.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def servers():
    ls, foreign = FakeServer("127.0.0.1"), FakeServer("127.0.0.2")
    yield ls, foreign
    ls.httpd.shutdown()
    foreign.httpd.shutdown()


@pytest.fixture
def ls(servers) -> FakeServer:
    servers[0].reset()
    return servers[0]


@pytest.fixture
def foreign(servers) -> FakeServer:
    servers[1].reset()
    return servers[1]


from tests.network_fixtures import connections, public_foreign  # noqa: E402,F401  (fixtures)


@pytest.fixture
def make_loader(tmp_path, ls):
    loaders: list[ImageLoader] = []

    def make(**overrides) -> ImageLoader:
        values = dict(label_studio_url=ls.url, label_studio_api_key=LEGACY, data_dir=tmp_path / "data",
                      image_allowed_hosts="127.0.0.2", image_allow_private=False, image_fetch_timeout=5.0,
                      image_max_bytes=5_000_000, image_max_pixels=50_000_000, local_files_document_root="")
        values.update(overrides)
        loader = ImageLoader(Settings(**values))
        loaders.append(loader)
        return loader

    yield make
    for loader in loaders:
        loader.close()


# --- image helpers ----------------------------------------------------------------------------

def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def red_blue(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", (width, height), (255, 0, 0))
    im.paste((0, 0, 255), (width // 2, 0, width, height))
    return im


def reason_of(loader: ImageLoader, url: str, task_id: int | None = None) -> str:
    with pytest.raises(ImageError) as info:
        loader.load(url, task_id)
    return info.value.reason


def close(pixel, expected, tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, with a token IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- Label Studio auth ------------------------------------------------------------------------

def test_ls_upload_with_legacy_token(make_loader, ls):
    data = encode(red_blue())
    ls.auth = {f"Token {LEGACY}"}
    ls.files["/data/upload/1/a.png"] = (data, "image/png")
    loader = make_loader(label_studio_api_key=LEGACY)
    for url in ("/data/upload/1/a.png", f"{ls.url}/data/upload/1/a.png"):
        loaded = loader.load(url, 1)
        assert (loaded.width, loaded.height) == (40, 20) and loaded.image.mode == "RGB"
        assert loaded.sha256 == hashlib.sha256(data).hexdigest() and loaded.data == data
        assert close(loaded.image.getpixel((0, 0)), (255, 0, 0))
    assert ls.auth_headers()[0] == f"Token {LEGACY}"
    assert ls.refreshes == 0


def test_ls_upload_with_pat_refreshes_once_and_after_401(make_loader, ls):
    ls.auth = set()
    for i in range(12):
        ls.files[f"/data/upload/1/{i}.png"] = (encode(Image.new("RGB", (8, 8), (i, 0, 0))), "image/png")
    loader = make_loader(label_studio_api_key=PAT)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda i: loader.load(f"/data/upload/1/{i}.png", 1), range(12)))
    assert [im.image.getpixel((0, 0))[0] for im in loaded] == list(range(12))
    assert ls.refreshes == 1, "one exchange of the PAT for the whole pool"
    gets = [h for m, _, h in ls.requests if m == "GET"]
    assert all(h["Authorization"].startswith("Bearer ") and PAT not in h["Authorization"] for h in gets)
    refresh = next(h for m, p, h in ls.requests if m == "POST")
    assert "Authorization" not in refresh

    ls.auth.clear()  # LS no longer accepts the cached access token (revoked / clock skew)
    ls.files["/data/upload/1/new.png"] = (encode(red_blue()), "image/png")
    assert loader.load("/data/upload/1/new.png", 1).width == 40
    assert ls.refreshes == 2
    assert ls.auth_headers()[-2] != ls.auth_headers()[-1]  # 401, then the new token


def test_expired_pat_is_a_clear_error(make_loader, ls):
    expired = jwt.encode({"token_type": "refresh", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    ls.auth = set()
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    with pytest.raises(ImageError) as info:
        make_loader(label_studio_api_key=expired).load("/data/upload/1/a.png")
    assert info.value.reason == "http_error" and "API key" in info.value.message
    assert expired not in str(info.value)


def test_ls_login_redirect_names_the_key(make_loader, ls):
    ls.redirects["/data/upload/1/a.png"] = "/user/login/?next=/data/upload/1/a.png"
    ls.files["/user/login/"] = (b"<html>login</html>", "text/html")
    with pytest.raises(ImageError) as info:
        make_loader().load("/data/upload/1/a.png")
    assert info.value.reason == "http_error" and "LABEL_STUDIO_API_KEY" in info.value.message


# --- decoding ---------------------------------------------------------------------------------

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


def test_data_url(make_loader):
    data = encode(red_blue())
    loaded = make_loader().load("data:image/png;base64," + base64.b64encode(data).decode())
    assert loaded.width == 40 and loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert reason_of(make_loader(), "data:text/html;base64,PGh0bWw+") == "not_an_image"
    assert reason_of(make_loader(), "data:image/png,rawbytes") == "decode_error"


def test_direct_decode_helper():
    assert decode_image(encode(red_blue()), max_pixels=10**6).size == (40, 20)


def test_ultralytics_open_patch_is_bypassed():
    """conftest imports ultralytics, which wraps Image.open (pip-installing pi-heif on unknown
    files); the loader must use Pillow's own open."""
    assert images._pillow_open().__module__ == "PIL.Image"
    with pytest.raises(ImageError) as info:
        decode_image(b"<html>nope</html>", max_pixels=100)
    assert info.value.reason == "not_an_image"


# --- SSRF -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "ftp://127.0.0.2/a.png",
    "dict://127.0.0.1:6379/info",
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:6379/",
    "http://localhost:6379/",
    "http://[::1]:6379/",
    "http://[::ffff:127.0.0.1]:6379/",
    "http://2130706433:6379/",
    "http://0.0.0.0:6379/",
    "http://10.1.2.3/a.png",
    "//169.254.169.254/latest/",
    "/\\169.254.169.254/latest/",
    "http://user:pw@127.0.0.2/a.png",
    "javascript:alert(1)",
])
def test_forbidden_urls_never_connect(make_loader, connections, url):
    loader = make_loader(image_allowed_hosts="*")  # the address check must refuse, not the allowlist
    start = time.monotonic()
    assert reason_of(loader, url) == "forbidden_url"
    assert connections == [] and time.monotonic() - start < 2


def test_foreign_host_needs_allowlist_and_gets_no_credentials(make_loader, ls, foreign, connections):
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    assert reason_of(make_loader(image_allowed_hosts=""), f"{foreign.url}/a.png") == "forbidden_url"
    assert connections == [] and foreign.requests == []
    for key in (LEGACY, PAT):
        assert make_loader(label_studio_api_key=key).load(f"{foreign.url}/a.png").width == 40
    assert foreign.auth_headers() == [None, None]
    assert ls.requests == [], "a PAT is not even exchanged for a foreign image"


def test_allow_private(make_loader, ls, foreign):
    """With LS on 127.0.0.2, the 127.0.0.1 server is a private foreign host."""
    ls.files["/a.png"] = (encode(red_blue()), "image/png")
    url = f"{ls.url}/a.png"
    assert reason_of(make_loader(label_studio_url=foreign.url, image_allowed_hosts="*"), url) == "forbidden_url"
    loaded = make_loader(label_studio_url=foreign.url, image_allowed_hosts="127.0.0.1", image_allow_private=True).load(url)
    assert loaded.width == 40 and ls.auth_headers() == [None]


def test_redirect_from_allowed_host_to_private_address_is_refused(make_loader, foreign, connections):
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.settimeout(0.2)
    port = trap.getsockname()[1]
    foreign.redirects["/r1"] = f"http://127.0.0.1:{port}/secret"
    foreign.redirects["/r2"] = "http://169.254.169.254/latest/meta-data/"
    foreign.redirects["/r3"] = f"http://localhost:{port}/"
    try:
        for route in ("/r1", "/r2", "/r3"):
            for hosts in ("127.0.0.2", "*"):
                reason = reason_of(make_loader(image_allowed_hosts=hosts), f"{foreign.url}{route}")
                assert reason == "forbidden_url", (route, hosts)
        with pytest.raises(socket.timeout):
            trap.accept()
    finally:
        trap.close()
    assert {addr[0] for addr in connections} == {"127.0.0.2"}


def test_dns_is_checked_once_and_the_checked_address_is_used(make_loader, foreign, connections, monkeypatch):
    """DNS rebinding: the name resolves to a public address for the check and a private one
    right after; the loader connects to what it checked, and re-checks on a new connection."""
    answers = {"rebind.test": ["127.0.0.2", "127.0.0.1"], "mixed.test": [["127.0.0.2", "10.0.0.1"]]}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in answers:
            ips = answers[host].pop(0)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ([ips] if isinstance(ips, str) else ips)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    port = foreign.url.rsplit(":", 1)[1]
    loader = make_loader(image_allowed_hosts="rebind.test,mixed.test")
    assert loader.load(f"http://rebind.test:{port}/a.png").width == 40
    assert foreign.requests[0][2]["Host"] == f"rebind.test:{port}"
    assert answers["rebind.test"] == ["127.0.0.1"], "resolved exactly once"
    assert reason_of(loader, f"http://rebind.test:{port}/a.png") == "forbidden_url"
    assert reason_of(loader, f"http://mixed.test:{port}/a.png") == "forbidden_url"
    assert [addr[0] for addr in connections] == ["127.0.0.2"]


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


def test_presign_cloud_uri(make_loader, ls, foreign, connections):
    foreign.files["/bucket/key.png"] = (encode(red_blue()), "image/png")
    ls.auth = set()
    ls.presign_location = lambda uri: f"{foreign.url}/bucket/key.png?X-Amz-Signature=deadbeef"
    loader = make_loader(label_studio_api_key=PAT, image_allowed_hosts="")
    assert loader.load("s3://bucket/key.png", task_id=7).width == 40
    assert ls.presigned == ["s3://bucket/key.png"]
    assert any(p.startswith("/tasks/7/presign/?fileuri=") for _, p, _ in ls.requests)
    assert foreign.auth_headers() == [None]
    n = len(connections)
    for uri in ("s3://bucket/key.png", "gs://b/k.jpg", "azure-blob://c/k.jpg"):
        assert reason_of(loader, uri) == "forbidden_url"  # no task id
    assert len(connections) == n


# --- local files ------------------------------------------------------------------------------

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


# --- errors, timeouts, cache, logs ------------------------------------------------------------

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


def test_logs_and_errors_never_contain_credentials(make_loader, ls, foreign, caplog):
    caplog.set_level(logging.DEBUG)
    ls.auth = set()
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    ls.redirects["/data/upload/1/moved.png"] = f"{foreign.url}/missing.png?sig=1"
    messages = []
    loader = make_loader(label_studio_api_key=PAT)
    loader.load("/data/upload/1/a.png")
    for url in ("/data/upload/1/moved.png", "/data/upload/1/none.png", "http://169.254.169.254/"):
        with pytest.raises(ImageError) as info:
            loader.load(url)
        messages.append(str(info.value))
    access = [h.split()[1] for h in ls.auth]
    legacy = make_loader(label_studio_api_key=LEGACY)
    with pytest.raises(ImageError) as info:
        legacy.load("/data/upload/1/b.png")  # 401 for the legacy key here
    messages.append(str(info.value))
    text = caplog.text + "\n".join(messages)
    assert caplog.text
    for secret in (PAT, LEGACY, *access):
        assert secret not in text


def test_https_label_studio_keeps_the_host_name_for_tls(make_loader, tmp_path):
    """The guard connects to the checked IP; certificate verification must still use the name."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server = FakeServer("127.0.0.1", context)
    try:
        server.auth = {f"Token {LEGACY}"}
        server.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
        port = server.httpd.server_address[1]
        loader = make_loader(label_studio_url=f"https://localhost:{port}")
        loader._session.verify = str(cert_file)
        assert loader.load("/data/upload/1/a.png").width == 40
        assert server.auth_headers() == [f"Token {LEGACY}"]
        by_ip = make_loader(label_studio_url=f"https://127.0.0.1:{port}")  # not a name on the cert
        by_ip._session.verify = str(cert_file)
        assert reason_of(by_ip, "/data/upload/1/a.png") == "http_error"
        assert len(server.requests) == 1
    finally:
        server.httpd.shutdown()
