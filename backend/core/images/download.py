"""One image GET under the SSRF and credential rules: manual redirects, each hop checked again.

Label Studio credentials go only to the Label Studio origin, and only while a redirect chain that
started there stays there: a PAT sent anywhere else is a stolen account. Any other host must be in
``IMAGE_ALLOWED_HOSTS`` ('*' = any public host), unless Label Studio itself redirected there (a
presigned storage URL). The address rules run at connect time (:mod:`backend.core.images.ssrf`).
Bytes and time are bounded.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from backend.core.images.errors import ImageError
from backend.core.images.label_studio_auth import LabelStudioAuth
from backend.core.images.ssrf import Origin, origin, redact

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


class Downloader:
    """GETs through a guarded session (:func:`backend.core.images.ssrf.guarded_session`), which
    the caller owns and closes, as it does ``auth``."""

    def __init__(self, session: requests.Session, *, ls_origin: Origin | None, auth: LabelStudioAuth | None,
                 allowed_hosts: set[str], allow_any_host: bool, timeout: float, max_bytes: int) -> None:
        self._session = session
        self.ls_origin = ls_origin
        self._auth = auth
        self.allowed_hosts = allowed_hosts
        self.allow_any_host = allow_any_host
        self.timeout = timeout
        self.max_bytes = max_bytes

    def is_ls(self, url: str) -> bool:
        """True if ``url`` is on the Label Studio origin (scheme, host, port)."""
        return self.ls_origin is not None and origin(url) == self.ls_origin

    def _check_hop(self, url: str, vouched: bool) -> None:
        """URL-level rules for one hop; the address rules run at connect time."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or origin(url) is None:
            raise ImageError("forbidden_url", f"{redact(url)} is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise ImageError("forbidden_url", "URLs with embedded credentials are not allowed")
        if self.is_ls(url) or vouched or self.allow_any_host or parts.hostname.lower() in self.allowed_hosts:
            return
        raise ImageError("forbidden_url", f"host {parts.hostname} is not in IMAGE_ALLOWED_HOSTS")

    def download(self, url: str) -> tuple[bytes, str]:
        """GET with manual redirects; returns (body, content type). Credentials only while the
        chain is on LS; hops after LS redirected away (presigned storage URLs, S3's regional 307s)
        skip the host allowlist, as LS chose them, but never the address check."""
        deadline = time.monotonic() + self.timeout
        on_ls_chain, vouched = True, False
        for _ in range(MAX_REDIRECTS + 1):
            self._check_hop(url, vouched)
            is_ls = self.is_ls(url)
            on_ls_chain = on_ls_chain and is_ls
            vouched = vouched or on_ls_chain
            response = self._get(url, deadline, with_auth=on_ls_chain and self._auth is not None)
            with response:
                if response.is_redirect:
                    location = urljoin(url, response.headers["Location"])
                    if is_ls and "/user/login" in urlsplit(location).path:
                        raise ImageError("http_error", "Label Studio redirected to its login page: "
                                                       "LABEL_STUDIO_API_KEY is missing or not accepted")
                    log.debug("image redirect %s -> %s", redact(url), redact(location))
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
                raise ImageError("timeout", f"{redact(url)} took longer than {self.timeout} s")
            try:
                response = self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                             timeout=(remaining, remaining))
            except ImageError:
                raise
            except requests.Timeout:
                raise ImageError("timeout", f"{redact(url)} took longer than {self.timeout} s") from None
            except requests.RequestException as exc:
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
                hint = (": LABEL_STUDIO_API_KEY is missing or not accepted"
                        if response.status_code in (401, 403) and self.is_ls(url) else "")
                raise ImageError("http_error", f"{redact(url)} answered HTTP {response.status_code}{hint}")
            return response
        raise AssertionError("unreachable")

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        """Stream the body, stopping at IMAGE_MAX_BYTES and at the overall deadline."""
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageError("too_large", f"{redact(url)} is {length} bytes (IMAGE_MAX_BYTES={self.max_bytes})")
        buf = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError("too_large", f"{redact(url)} exceeds IMAGE_MAX_BYTES={self.max_bytes}")
                if time.monotonic() > deadline:
                    raise ImageError("timeout", f"{redact(url)} took longer than {self.timeout} s")
        except requests.RequestException as exc:
            cause = exc.args[0] if exc.args else None
            if isinstance(exc, requests.Timeout) or isinstance(cause, urllib3.exceptions.TimeoutError):
                raise ImageError("timeout", f"{redact(url)} took longer than {self.timeout} s") from None
            raise ImageError("http_error", f"{redact(url)}: body interrupted ({type(exc).__name__})") from None
        return bytes(buf)
