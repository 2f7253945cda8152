"""One image GET under the SSRF and credential rules: manual redirects, each hop judged on its own.

A redirect chain keeps none of the trust of its first hop. Every hop must pass the URL rules
(http(s), no userinfo, host = Label Studio's or allowed by ``IMAGE_ALLOWED_HOSTS``) and, at connect
time, the address rules (:mod:`backend.core.images.ssrf`). Label Studio's token goes to a hop only
if that hop is a Label Studio media path (:func:`backend.core.images.label_studio_auth.is_media_path`)
and the chain has not left Label Studio: a PAT sent anywhere else is a stolen account, and one sent
to ``/api/...`` lets task data read Label Studio's API. Bytes are bounded, and so is time: one
wall-clock deadline (``IMAGE_FETCH_TIMEOUT``) covers connect, TLS, every hop and the body
(:mod:`backend.core.images.deadline`), so a server that drips its answer cannot hold a fetch.
"""

from __future__ import annotations

import logging
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from backend.core.images.deadline import Deadline
from backend.core.images.errors import ImageError
from backend.core.images.label_studio_auth import LabelStudioAuth, is_media_path
from backend.core.images.ssrf import Origin, origin, redact

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
MEDIA_PATHS = "/data/upload/, /data/local-files/, /tasks/<id>/presign/"


class Downloader:
    """GETs through a guarded session (:func:`backend.core.images.ssrf.guarded_session`), which
    the caller owns and closes, as it does ``auth``."""

    def __init__(self, session: requests.Session, *, ls_origin: Origin | None, auth: LabelStudioAuth | None,
                 allowed_hosts: set[str], allow_any_host: bool, timeout: float, max_bytes: int,
                 ls_base_path: str = "") -> None:
        self._session = session
        self.ls_origin = ls_origin
        self.ls_base_path = ls_base_path.rstrip("/")
        self._auth = auth
        self.allowed_hosts = {h for h in allowed_hosts if not h.startswith("*.")}
        self.allowed_suffixes = tuple(h[1:] for h in allowed_hosts if h.startswith("*."))  # "*.x.com" -> ".x.com"
        self.allow_any_host = allow_any_host
        self.timeout = timeout
        self.max_bytes = max_bytes

    def is_ls(self, url: str) -> bool:
        """True if ``url`` is on the Label Studio origin (scheme, host, port)."""
        return self.ls_origin is not None and origin(url) == self.ls_origin

    def is_ls_media(self, url: str) -> bool:
        """True if ``url`` is a Label Studio media URL, the only kind that gets its token."""
        return self.is_ls(url) and is_media_path(urlsplit(url).path, self.ls_base_path)

    def _check_hop(self, url: str) -> None:
        """URL-level rules for one hop, whatever the hops before it; the address rules run at connect time."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or origin(url) is None:
            raise ImageError("forbidden_url", f"{redact(url)} is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise ImageError("forbidden_url", "URLs with embedded credentials are not allowed")
        host = parts.hostname.lower()
        if self.is_ls(url) or self.allow_any_host or host in self.allowed_hosts or host.endswith(self.allowed_suffixes):
            return
        raise ImageError("forbidden_url", f"host {parts.hostname} is not in IMAGE_ALLOWED_HOSTS")

    def download(self, url: str) -> tuple[bytes, str]:
        """GET with manual redirects, all within one deadline; returns (body, content type)."""
        with Deadline(self.timeout) as deadline:
            on_ls = True
            for _ in range(MAX_REDIRECTS + 1):
                self._check_hop(url)
                is_ls = self.is_ls(url)
                on_ls = on_ls and is_ls  # a chain that left Label Studio never gets its token back
                media = on_ls and self.is_ls_media(url)
                response = self._get(url, deadline, media=media)
                with response:
                    if response.is_redirect:
                        location = urljoin(url, response.headers["Location"])
                        if is_ls and "/user/login" in urlsplit(location).path:
                            why = self._why_refused(media)
                            raise ImageError("http_error", f"Label Studio redirected to its login page: {why}")
                        log.debug("image redirect %s -> %s", redact(url), redact(location))
                        url = location
                        continue
                    body = self._read_body(response, url, deadline)
                    if deadline.expired:  # a body without Content-Length cut by the watchdog looks complete
                        raise self._timeout(url)
                    return body, response.headers.get("Content-Type", "")
            raise ImageError("http_error", f"more than {MAX_REDIRECTS} redirects")

    def _why_refused(self, media: bool) -> str:
        if media:
            return "LABEL_STUDIO_API_KEY is missing or not accepted"
        return f"its token is sent only to media paths ({MEDIA_PATHS})"

    def _timeout(self, url: str) -> ImageError:
        return ImageError("timeout", f"{redact(url)} took longer than IMAGE_FETCH_TIMEOUT={self.timeout} s")

    def _get(self, url: str, deadline: Deadline, *, media: bool) -> requests.Response:
        """One GET (no redirects followed), with the token if ``media``; a 401 from LS with a PAT
        is retried once after dropping the cached access token."""
        with_auth = media and self._auth is not None
        for attempt in (0, 1):
            headers, generation = {}, None
            if with_auth:
                assert self._auth is not None
                headers["Authorization"], generation = self._auth.header()
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timeout(url)
            try:
                response = self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                             timeout=(remaining, remaining))
            except ImageError:
                raise
            except requests.RequestException as exc:
                if deadline.expired or isinstance(exc, requests.Timeout):
                    raise self._timeout(url) from None
                raise ImageError("http_error", f"{redact(url)}: {type(exc).__name__}") from None
            if response.status_code == 401 and attempt == 0 and headers.get("Authorization", "").startswith("Bearer "):
                response.close()
                assert self._auth is not None
                self._auth.invalidate(generation)
                continue
            if response.status_code in (404, 410):
                response.close()
                raise ImageError("not_found", f"{redact(url)} answered HTTP {response.status_code}")
            if not response.ok and not response.is_redirect:
                response.close()
                hint = (f": {self._why_refused(media)}" if response.status_code in (401, 403) and self.is_ls(url) else "")
                raise ImageError("http_error", f"{redact(url)} answered HTTP {response.status_code}{hint}")
            return response
        raise AssertionError("unreachable")

    def _read_body(self, response: requests.Response, url: str, deadline: Deadline) -> bytes:
        """Stream the body, stopping at IMAGE_MAX_BYTES and at the deadline."""
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageError("too_large", f"{redact(url)} is {length} bytes (IMAGE_MAX_BYTES={self.max_bytes})")
        buf = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError("too_large", f"{redact(url)} exceeds IMAGE_MAX_BYTES={self.max_bytes}")
                if deadline.remaining() <= 0:
                    raise self._timeout(url)
        except requests.RequestException as exc:
            cause = exc.args[0] if exc.args else None
            if deadline.expired or isinstance(exc, requests.Timeout) or isinstance(cause, urllib3.exceptions.TimeoutError):
                raise self._timeout(url) from None
            raise ImageError("http_error", f"{redact(url)}: body interrupted ({type(exc).__name__})") from None
        return bytes(buf)
