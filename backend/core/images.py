"""Fetch and decode the image a task points at: the backend's SSRF and local-file boundary.

Task data is written by whoever can import tasks, so an image URL is untrusted input that makes
this process open connections and read files. The rules, and why:

* Label Studio credentials go only to the Label Studio origin (scheme, host, port), and only while
  a redirect chain that started there stays there: a PAT sent anywhere else is a stolen account.
* Any other http(s) host must be listed in ``IMAGE_ALLOWED_HOSTS`` ('*' = any public host), and
  every address a host resolves to must be public unless it is the Label Studio host or
  ``IMAGE_ALLOW_PRIVATE`` is set (cloud metadata at 169.254.169.254, Redis on 127.0.0.1:6379...).
  The address check runs inside the connection, on the very address that is then connected to, so
  DNS rebinding between "check" and "connect" is impossible; redirects are followed by hand and
  every hop is checked again.
* ``/data/local-files/?d=`` is read under ``LOCAL_FILES_DOCUMENT_ROOT`` when configured, and only
  if the real path (symlinks resolved) stays inside it.
* Cloud URIs (s3://, gs://, azure-blob://) are resolved by Label Studio's presign endpoint, which
  holds the storage credentials; the signed URL it redirects to is fetched without ours.
* Bytes, decoded pixels and time are bounded; only raster formats Pillow decodes in-process are
  opened (no EPS/Ghostscript, no SVG).
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import io
import ipaddress
import logging
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from backend.core.settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5
# Raster formats Pillow decodes in-process (JPEG includes phones' MPO). EPS would shell out to
# Ghostscript; the other exotic formats are rare enough that refusing them costs nothing.
Image.init()
_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF") if f in Image.OPEN)
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageError(Exception):
    """Why an image could not be used. ``reason`` is a stable code for metrics and task notes:
    forbidden_url, not_found, too_large, timeout, http_error, not_an_image, unsupported_format,
    decode_error, bomb. ``message`` is human-readable and never contains credentials."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: RGB, EXIF orientation applied (the orientation Label Studio shows, so box
    percentages line up), first frame only. ``sha256`` is of the original bytes ``data``."""

    image: Image.Image
    width: int
    height: int
    sha256: str
    data: bytes


# --- address policy -------------------------------------------------------------------------------

def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses; v4 embedded in v6 is judged as v4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return False
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


Guard = Callable[[str, str, int, "ipaddress.IPv4Address | ipaddress.IPv6Address"], bool]


class _GuardedConnectionMixin:
    """Resolves the host itself, refuses if any address is not allowed, then connects to exactly
    the addresses it checked (the TLS server name and Host header keep the original name)."""

    guard: Guard
    scheme: str

    def _new_conn(self) -> socket.socket:
        name: str = self._dns_host  # type: ignore[attr-defined]
        port: int = self.port  # type: ignore[attr-defined]
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(name, self, exc) from exc  # type: ignore[arg-type]
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        host = name.strip("[]").lower()
        for address in addresses:
            if not self.guard(self.scheme, host, port, ipaddress.ip_address(address.split("%")[0])):
                raise ImageError("forbidden_url", f"{host} resolves to a non-public address ({address})")
        last: Exception | None = None
        for address in addresses:
            self._dns_host = address  # type: ignore[attr-defined]
            try:
                return super()._new_conn()  # type: ignore[misc]
            except (NewConnectionError, ConnectTimeoutError) as exc:
                last = exc
            finally:
                self._dns_host = name  # type: ignore[attr-defined]
        raise last or NewConnectionError(self, f"no address for {host}")  # type: ignore[arg-type]


class _GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connection pools use the guarded connections above."""

    def __init__(self, guard: Guard, **kwargs: Any) -> None:
        self._guard = guard
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard = staticmethod(self._guard)
        http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection),
                         {"guard": guard, "scheme": "http"})
        https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection),
                          {"guard": guard, "scheme": "https"})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        raise ImageError("forbidden_url", "proxies are not used for image downloads")


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """A shared session must not carry one host's cookies (e.g. a LS session) to requests."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
    return scheme, parts.hostname.lower(), port


def _redact(url: str) -> str:
    """URL for messages and logs: no userinfo, no query (presigned signatures), no data payload."""
    if url.startswith("data:"):
        return url[:30] + "..."
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    return shown + ("?..." if parts.query else "")


# --- Label Studio auth ----------------------------------------------------------------------------

class _LabelStudioAuth:
    """The ``Authorization`` value for Label Studio, computed by label-studio-sdk.

    The SDK's client decides Token (legacy key) vs Bearer (PAT = JWT refresh token), exchanges the
    PAT at /api/token/refresh/ and refreshes the 300 s access token when it expires, under a lock.
    We reuse that instead of re-implementing JWT handling; the SDK exposes the header only through
    ``_client_wrapper.get_headers()``. A 401 despite a fresh-looking token (clock skew, revoked
    token) drops the client so the next call refreshes.
    """

    def __init__(self, base_url: str, api_key: str, timeout: float) -> None:
        self._base_url, self._api_key, self._timeout = base_url, api_key, timeout
        self._lock = threading.Lock()
        self._client: Any = None
        self._http: Any = None

    def header(self) -> tuple[str, object]:
        """(header value, generation); pass the generation to :meth:`invalidate` after a 401."""
        import httpx
        from label_studio_sdk import LabelStudio
        from label_studio_sdk.core.api_error import ApiError

        try:
            with self._lock:
                if self._client is None:
                    if self._http is None:
                        self._http = httpx.Client(timeout=self._timeout, follow_redirects=False, trust_env=False)
                    # Trailing slash: the SDK urljoins "api/token/refresh/" onto the base URL.
                    self._client = LabelStudio(base_url=self._base_url + "/", api_key=self._api_key,
                                               httpx_client=self._http, timeout=self._timeout)
                client = self._client
            return client._client_wrapper.get_headers()["Authorization"], client
        except ApiError as exc:
            raise ImageError("http_error", f"Label Studio refused the API key (HTTP {exc.status_code}): "
                                           "check LABEL_STUDIO_API_KEY") from None
        except httpx.TimeoutException:
            raise ImageError("timeout", "Label Studio token refresh timed out") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise ImageError("http_error", f"Label Studio token refresh failed ({type(exc).__name__})") from None

    def invalidate(self, generation: object) -> None:
        """Forget the client (and its access token) if no other thread replaced it already."""
        with self._lock:
            if self._client is generation:
                self._client = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


# --- decoding -------------------------------------------------------------------------------------

def _looks_like_svg(head: bytes, content_type: str) -> bool:
    return "svg" in content_type or b"<svg" in head[:4096].lower()


def _looks_like_text(head: bytes, content_type: str) -> bool:
    if content_type.startswith(("text/", "application/json", "application/xml", "application/pdf")):
        return True
    stripped = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    return stripped.startswith((b"<", b"{", b"[", b"%PDF"))


def _pillow_open() -> Callable[..., Image.Image]:
    """Pillow's own ``Image.open``. Importing ultralytics replaces it process-wide with a wrapper
    that, on any unidentified file, runs a requirements check (a pip install when autoinstall is
    on) and loads a HEIF plugin; untrusted bytes must not trigger either. Looked up per call
    because ultralytics may be imported after this module."""
    opener = Image.open
    if getattr(opener, "__module__", Image.__name__) != Image.__name__:
        original = getattr(sys.modules.get(opener.__module__), "_image_open", None)
        if getattr(original, "__module__", None) == Image.__name__:
            return original
    return opener


def _stretch_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale: linear stretch of the used range to 0-255. A plain
    ``convert("L")`` clips at 255, which turns any 16-bit image white."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:
        arr = np.full(arr.shape, 255.0 if hi > 255 else max(hi, 0.0), dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white (what a viewer shows)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _stretch_to_rgb(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int, content_type: str = "") -> Image.Image:
    """Decode ``data`` to an RGB, EXIF-transposed first frame.

    The pixel limit is checked on the header, before anything is decoded, per call (Pillow's
    ``MAX_IMAGE_PIXELS`` is a process global and stays untouched as a second fence).
    """
    content_type = content_type.split(";")[0].strip().lower()
    if not data:
        raise ImageError("decode_error", "empty file")
    try:
        im = _pillow_open()(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("bomb", f"image declares too many pixels ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, or any of the many types malformed headers raise
        if _looks_like_svg(data, content_type):
            raise ImageError("unsupported_format", "SVG is a vector format and is not supported; use PNG or JPEG") from None
        if _looks_like_text(data, content_type):
            raise ImageError("not_an_image", f"content is not an image ({content_type or 'text'})") from None
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError("decode_error", "unrecognised or unsupported image format") from None
        raise ImageError("decode_error", f"cannot read image header ({type(exc).__name__})") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError("decode_error", "image has no pixels")
    if width * height > max_pixels:
        raise ImageError("bomb", f"{width}x{height} exceeds IMAGE_MAX_PIXELS={max_pixels}")
    try:
        im.seek(0)
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF: browsers ignore it too, so keep the stored orientation
            log.debug("ignoring unreadable EXIF orientation")
        return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("bomb", str(exc)) from None
    except Exception as exc:
        raise ImageError("decode_error", f"cannot decode {im.format or 'image'} ({exc})") from None


# --- the loader -----------------------------------------------------------------------------------

class ImageLoader:
    """Loads task images under the rules in the module docstring. One instance is meant to be
    shared by a thread pool: the requests session is only used for simple GETs (its connection
    pools are thread-safe; cookies are disabled), and the auth client refreshes under a lock."""

    def __init__(self, settings: Settings, *, cache: bool = True) -> None:
        self.max_bytes = settings.image_max_bytes
        self.max_pixels = settings.image_max_pixels
        self.timeout = settings.image_fetch_timeout
        self.allow_private = settings.image_allow_private
        hosts = {h.strip().lower() for h in settings.image_allowed_hosts.split(",") if h.strip()}
        self.allow_any_host = "*" in hosts
        self.allowed_hosts = hosts - {"*"}
        self.ls_url = settings.label_studio_url.strip().rstrip("/")
        self.ls_origin = _origin(self.ls_url) if self.ls_url else None
        if self.ls_url and self.ls_origin is None:
            log.warning("LABEL_STUDIO_URL is not an http(s) URL; Label Studio media cannot be loaded")
        self.ls_path = urlsplit(self.ls_url).path if self.ls_origin else ""
        api_key = settings.label_studio_api_key.get_secret_value()
        if self.ls_origin and not api_key:
            log.warning("LABEL_STUDIO_API_KEY is empty: Label Studio media will be fetched without credentials")
        self._auth = _LabelStudioAuth(self.ls_url, api_key, self.timeout) if api_key and self.ls_origin else None
        root = settings.local_files_document_root.strip()
        self.local_root = Path(root).resolve() if root else None
        self.cache_dir = Path(settings.data_dir) / "images" if cache else None

        self._session = requests.Session()
        self._session.trust_env = False  # no env proxies (they bypass the address check), no .netrc
        self._session.cookies.set_policy(_NoCookies())
        self._session.headers["Accept"] = "image/*,*/*;q=0.8"
        adapter = _GuardedAdapter(self._address_allowed, pool_connections=16, pool_maxsize=32, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()
        if self._auth is not None:
            self._auth.close()

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public ---------------------------------------------------------------------------------

    def load(self, url: str, task_id: int | None = None) -> LoadedImage:
        """Fetch and decode the image ``url`` of task ``task_id``; raises :class:`ImageError`."""
        data, content_type, cache_path = self._fetch(url.strip() if isinstance(url, str) else "", task_id)
        image = decode_image(data, max_pixels=self.max_pixels, content_type=content_type)
        if cache_path is not None:
            self._cache_write(cache_path, data)
        return LoadedImage(image=image, width=image.width, height=image.height,
                           sha256=hashlib.sha256(data).hexdigest(), data=data)

    # --- dispatch -------------------------------------------------------------------------------

    def _fetch(self, url: str, task_id: int | None) -> tuple[bytes, str, Path | None]:
        """Returns (bytes, content type, cache path to fill after a successful decode)."""
        if not url:
            raise ImageError("forbidden_url", "empty image URL")
        if url[:5].lower() == "data:":
            return self._from_data_url(url)
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._from_cloud(url, task_id), "", None
        if not scheme and url.startswith("/") and not url.startswith(("//", "/\\")):
            if not self.ls_origin:
                raise ImageError("forbidden_url", f"relative URL {_redact(url)} needs LABEL_STUDIO_URL")
            url = self.ls_url + url
        elif scheme not in ("http", "https"):
            raise ImageError("forbidden_url", f"URL scheme {scheme or '(none)'!r} is not allowed")
        parts = urlsplit(url)
        if self._is_ls(url):
            path = parts.path[len(self.ls_path):] if parts.path.startswith(self.ls_path) else parts.path
            if path.rstrip("/") == "/data/local-files" and self.local_root is not None:
                rel = parse_qs(parts.query).get("d", [""])[0]
                return self._from_local_root(rel), "", None
            if path.startswith("/data/upload/") and self.cache_dir is not None:
                cache_path = self.cache_dir / hashlib.sha256(url.encode()).hexdigest()
                cached = self._cache_read(cache_path)
                if cached is not None:
                    return cached, "", None
                data, content_type = self._download(url)
                return data, content_type, cache_path
        return (*self._download(url), None)

    def _is_ls(self, url: str) -> bool:
        return self.ls_origin is not None and _origin(url) == self.ls_origin

    def _address_allowed(self, scheme: str, host: str, port: int,
                         ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Connection-time check (see :class:`_GuardedConnectionMixin`)."""
        if self.allow_private or (scheme, host, port) == self.ls_origin:
            return True
        return _is_public(ip)

    # --- sources --------------------------------------------------------------------------------

    def _from_data_url(self, url: str) -> tuple[bytes, str, None]:
        """Inline ``data:image/...;base64,`` images, which LS tasks may carry."""
        header, sep, payload = url[5:].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        mime = params[0]
        if not sep or "base64" not in params[1:]:
            raise ImageError("decode_error", "only base64 data: URLs are supported")
        if mime and not mime.startswith("image/"):
            raise ImageError("not_an_image", f"data: URL of type {mime}")
        if len(payload) * 3 // 4 > self.max_bytes + 3:
            raise ImageError("too_large", f"inline image exceeds IMAGE_MAX_BYTES={self.max_bytes}")
        raw = unquote_to_bytes(payload).translate(None, b" \t\r\n").translate(bytes.maketrans(b"-_", b"+/"))
        raw = raw.rstrip(b"=")
        try:
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except ValueError:
            raise ImageError("decode_error", "invalid base64 in data: URL") from None
        if len(data) > self.max_bytes:
            raise ImageError("too_large", f"inline image exceeds IMAGE_MAX_BYTES={self.max_bytes}")
        return data, mime, None

    def _from_local_root(self, rel: str) -> bytes:
        """A ``?d=`` path under LOCAL_FILES_DOCUMENT_ROOT; the real path must stay inside it."""
        assert self.local_root is not None
        if not rel or "\x00" in rel:
            raise ImageError("forbidden_url", "local-files URL without a valid d= path")
        if rel.startswith(("/", "\\")) or os.path.isabs(rel) or ".." in PurePosixPath(rel).parts:
            raise ImageError("forbidden_url", f"local-files path {rel!r} is absolute or climbs out of the root")
        root = self.local_root
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise ImageError("forbidden_url", f"local-files path {rel!r} resolves outside LOCAL_FILES_DOCUMENT_ROOT")
        try:
            # O_NONBLOCK: opening a FIFO planted under the root must not hang the worker.
            fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise ImageError("not_found", f"local file {rel!r} does not exist") from None
        except OSError as exc:
            raise ImageError("not_found", f"local file {rel!r} cannot be opened ({exc.strerror})") from None
        try:
            # Re-check what was actually opened, in case a directory was swapped for a symlink
            # between resolve() and open() (Linux exposes the opened path under /proc).
            proc = f"/proc/self/fd/{fd}"
            if os.path.exists(proc) and not Path(os.readlink(proc)).is_relative_to(root):
                raise ImageError("forbidden_url", f"local-files path {rel!r} escaped the root")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("not_found", f"local file {rel!r} is not a regular file")
            if st.st_size > self.max_bytes:
                raise ImageError("too_large", f"{st.st_size} bytes exceeds IMAGE_MAX_BYTES={self.max_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(self.max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise ImageError("too_large", f"file exceeds IMAGE_MAX_BYTES={self.max_bytes}")
        return data

    def _from_cloud(self, uri: str, task_id: int | None) -> bytes:
        """s3:// gs:// azure-blob:// through LS's presign endpoint (it holds storage credentials)."""
        if isinstance(task_id, bool) or not isinstance(task_id, (int, str)) or not str(task_id).isascii() \
                or not str(task_id).isdigit():
            raise ImageError("forbidden_url", f"{uri.split(':', 1)[0]}:// URIs need a task id to be presigned by Label Studio")
        if not self.ls_origin:
            raise ImageError("forbidden_url", "cloud storage URIs need LABEL_STUDIO_URL")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()  # as label-studio-sdk encodes it
        return self._download(f"{self.ls_url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}")[0]

    # --- HTTP -----------------------------------------------------------------------------------

    def _check_hop(self, url: str, vouched: bool) -> None:
        """URL-level rules for one hop; the address rules run at connect time."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or _origin(url) is None:
            raise ImageError("forbidden_url", f"{_redact(url)} is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise ImageError("forbidden_url", "URLs with embedded credentials are not allowed")
        if self._is_ls(url) or vouched or self.allow_any_host or parts.hostname.lower() in self.allowed_hosts:
            return
        raise ImageError("forbidden_url", f"host {parts.hostname} is not in IMAGE_ALLOWED_HOSTS")

    def _download(self, url: str) -> tuple[bytes, str]:
        """GET with manual redirects. Credentials only while the chain is on LS; hops after LS
        redirected away (presigned storage URLs, S3's regional 307s) skip the host allowlist,
        as LS chose them, but never the address check."""
        deadline = time.monotonic() + self.timeout
        on_ls_chain, vouched = True, False
        for _ in range(MAX_REDIRECTS + 1):
            self._check_hop(url, vouched)
            is_ls = self._is_ls(url)
            on_ls_chain = on_ls_chain and is_ls
            vouched = vouched or on_ls_chain
            response = self._get(url, deadline, with_auth=on_ls_chain and self._auth is not None)
            with response:
                if response.is_redirect:
                    location = urljoin(url, response.headers["Location"])
                    if is_ls and "/user/login" in urlsplit(location).path:
                        raise ImageError("http_error", "Label Studio redirected to its login page: "
                                                       "LABEL_STUDIO_API_KEY is missing or not accepted")
                    log.debug("image redirect %s -> %s", _redact(url), _redact(location))
                    url = location
                    continue
                return self._read_body(response, url, deadline), response.headers.get("Content-Type", "")
        raise ImageError("http_error", f"more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, deadline: float, *, with_auth: bool) -> requests.Response:
        """One GET (no redirects followed); a 401 from LS with a PAT is retried once after
        dropping the cached access token."""
        for attempt in (0, 1):
            headers, generation = {}, None
            if with_auth:
                assert self._auth is not None
                headers["Authorization"], generation = self._auth.header()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError("timeout", f"{_redact(url)} took longer than {self.timeout} s")
            try:
                response = self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                             timeout=(remaining, remaining))
            except ImageError:
                raise
            except requests.Timeout:
                raise ImageError("timeout", f"{_redact(url)} took longer than {self.timeout} s") from None
            except requests.RequestException as exc:
                raise ImageError("http_error", f"{_redact(url)}: {type(exc).__name__}") from None
            if response.status_code == 401 and attempt == 0 and headers.get("Authorization", "").startswith("Bearer "):
                response.close()
                assert self._auth is not None
                self._auth.invalidate(generation)
                continue
            if response.status_code in (404, 410):
                response.close()
                raise ImageError("not_found", f"{_redact(url)} answered HTTP {response.status_code}")
            if not response.ok and not response.is_redirect:
                response.close()
                hint = (": LABEL_STUDIO_API_KEY is missing or not accepted"
                        if response.status_code in (401, 403) and self._is_ls(url) else "")
                raise ImageError("http_error", f"{_redact(url)} answered HTTP {response.status_code}{hint}")
            return response
        raise AssertionError("unreachable")

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        """Stream the body, stopping at IMAGE_MAX_BYTES and at the overall deadline."""
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageError("too_large", f"{_redact(url)} is {length} bytes (IMAGE_MAX_BYTES={self.max_bytes})")
        buf = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError("too_large", f"{_redact(url)} exceeds IMAGE_MAX_BYTES={self.max_bytes}")
                if time.monotonic() > deadline:
                    raise ImageError("timeout", f"{_redact(url)} took longer than {self.timeout} s")
        except requests.RequestException as exc:
            cause = exc.args[0] if exc.args else None
            if isinstance(exc, requests.Timeout) or isinstance(cause, urllib3.exceptions.TimeoutError):
                raise ImageError("timeout", f"{_redact(url)} took longer than {self.timeout} s") from None
            raise ImageError("http_error", f"{_redact(url)}: body interrupted ({type(exc).__name__})") from None
        return bytes(buf)

    # --- cache ----------------------------------------------------------------------------------

    def _cache_read(self, path: Path) -> bytes | None:
        """LS uploads are immutable, so a hit needs no revalidation. The key is the absolute URL,
        so two Label Studio hosts never share entries."""
        try:
            if path.stat().st_size <= self.max_bytes:
                return path.read_bytes()
        except OSError:
            pass
        return None

    def _cache_write(self, path: Path, data: bytes) -> None:
        """Atomic (temp file + rename): a concurrent reader sees the whole file or none."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.debug("image cache write failed: %s", exc)
