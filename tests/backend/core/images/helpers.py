"""Shared by the image package's tests: a fake HTTP server (Label Studio or a foreign host),
the credentials it accepts, and small image builders."""

from __future__ import annotations

import base64
import io
import json
import socket
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from PIL import Image

from backend.core.images import ImageError, ImageLoader

SECRET = "test-signing-key-0123456789abcdef0123"
LEGACY = "legacy0123456789abcdef0123456789abcdef"
PAT = jwt.encode({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-1", "user_id": 1},
                 SECRET, algorithm="HS256")


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


class DripServer:
    """A real HTTP server on ``host`` that answers one byte every ``interval`` seconds, forever
    as far as a fetch is concerned (hours in total). ``mode``: "body" (a Content-Length it never
    reaches), "no_length" (a body ended only by closing) or "headers" (the headers never end).
    ``started`` is set when a request arrives, ``ended`` when the client hung up on the drip."""

    def __init__(self, host: str = "127.0.0.1", interval: float = 0.2) -> None:
        self.mode = "body"
        self.interval = interval
        self.started, self.ended, self.stop = threading.Event(), threading.Event(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.started.set()
                try:
                    if server.mode == "headers":
                        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nX-Drip: ")
                    else:
                        self.send_response(200)
                        self.send_header("Content-Type", "image/png")
                        if server.mode == "body":
                            self.send_header("Content-Length", "60000")
                        self.end_headers()
                    for _ in range(60_000):  # under http.client's 64 KB header line limit
                        if server.stop.wait(server.interval):
                            return
                        self.wfile.write(b"a")
                except OSError:
                    server.ended.set()

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class TLSDripServer:
    """A TCP server on ``host`` that takes a TLS ClientHello and answers with the header of a 16 KB
    handshake record, then one byte of it every ``interval`` seconds: the client stays inside its
    TLS handshake (no certificate is ever sent), where no per-read timeout trips either."""

    def __init__(self, host: str = "127.0.0.1", interval: float = 0.2) -> None:
        self.interval = interval
        self.started, self.ended, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.listener = socket.create_server((host, 0))
        self.url = f"https://{host}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not conn.recv(4096):  # the ClientHello
                    return
                self.started.set()
                conn.sendall(b"\x16\x03\x03\x40\x00")  # handshake record, 16384 bytes to come
                for _ in range(16_000):
                    if self.stop.wait(self.interval):
                        return
                    conn.sendall(b"\x00")
            except OSError:
                self.ended.set()
                return
            self.ended.set()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


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
