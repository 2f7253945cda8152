"""ImageLoader: where a task's image URL points, and the bytes and picture it yields.

URL resolution, by kind of URL:

* ``data:image/...;base64,`` is decoded inline (bounded by ``IMAGE_MAX_BYTES``).
* ``/data/local-files/?d=`` is read under ``LOCAL_FILES_DOCUMENT_ROOT`` when configured, and only
  if the real path (symlinks resolved) stays inside it.
* Cloud URIs (s3://, gs://, azure-blob://) are resolved by Label Studio's presign endpoint, which
  holds the storage credentials; the signed URL it redirects to is fetched without ours, and only
  if its host is allowed like any other (``IMAGE_ALLOWED_HOSTS``, e.g. ``*.amazonaws.com``).
* Relative URLs are on Label Studio; its ``/data/upload/`` files are cached on disk.
* Everything else is an http(s) download under the rules of :mod:`backend.core.images.download`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from PIL import Image

from backend.core.images.decode import decode_image
from backend.core.images.disk_cache import UploadCache
from backend.core.images.download import Downloader
from backend.core.images.errors import ImageError
from backend.core.images.label_studio_auth import LabelStudioAuth
from backend.core.images.ssrf import address_guard, guarded_session, origin, redact
from backend.core.settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: RGB, EXIF orientation applied (the orientation Label Studio shows, so box
    percentages line up), first frame only. ``sha256`` is of the original bytes ``data``."""

    image: Image.Image
    width: int
    height: int
    sha256: str
    data: bytes


class ImageLoader:
    """Loads task images under the rules in the package docstring. One instance is meant to be
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
        self.ls_origin = origin(self.ls_url) if self.ls_url else None
        if self.ls_url and self.ls_origin is None:
            log.warning("LABEL_STUDIO_URL is not an http(s) URL; Label Studio media cannot be loaded")
        self.ls_path = urlsplit(self.ls_url).path if self.ls_origin else ""
        api_key = settings.label_studio_api_key.get_secret_value()
        if self.ls_origin and not api_key:
            log.warning("LABEL_STUDIO_API_KEY is empty: Label Studio media will be fetched without credentials")
        self._auth = LabelStudioAuth(self.ls_url, api_key, self.timeout) if api_key and self.ls_origin else None
        root = settings.local_files_document_root.strip()
        self.local_root = Path(root).resolve() if root else None
        self._cache = (UploadCache(Path(settings.data_dir) / "images", self.max_bytes, settings.image_cache_max_mb * 1024 * 1024)
                       if cache else None)

        self._session = guarded_session(address_guard(allow_private=self.allow_private, trusted_origin=self.ls_origin))
        self._downloader = Downloader(self._session, ls_origin=self.ls_origin, auth=self._auth,
                                      allowed_hosts=self.allowed_hosts, allow_any_host=self.allow_any_host,
                                      timeout=self.timeout, max_bytes=self.max_bytes, ls_base_path=self.ls_path)

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
        data, content_type, cache_key = self._fetch(url.strip() if isinstance(url, str) else "", task_id)
        image = decode_image(data, max_pixels=self.max_pixels, content_type=content_type)
        if cache_key is not None and self._cache is not None:
            self._cache.write(cache_key, data)
        return LoadedImage(image=image, width=image.width, height=image.height,
                           sha256=hashlib.sha256(data).hexdigest(), data=data)

    # --- dispatch -------------------------------------------------------------------------------

    def _fetch(self, url: str, task_id: int | None) -> tuple[bytes, str, str | None]:
        """Returns (bytes, content type, cache key to fill after a successful decode)."""
        if not url:
            raise ImageError("forbidden_url", "empty image URL")
        if url[:5].lower() == "data:":
            return self._from_data_url(url)
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._from_cloud(url, task_id), "", None
        if not scheme and url.startswith("/") and not url.startswith(("//", "/\\")):
            if not self.ls_origin:
                raise ImageError("forbidden_url", f"relative URL {redact(url)} needs LABEL_STUDIO_URL")
            url = self.ls_url + url
        elif scheme not in ("http", "https"):
            raise ImageError("forbidden_url", f"URL scheme {scheme or '(none)'!r} is not allowed")
        parts = urlsplit(url)
        if self._downloader.is_ls(url):
            path = parts.path[len(self.ls_path):] if parts.path.startswith(self.ls_path) else parts.path
            if path.rstrip("/") == "/data/local-files" and self.local_root is not None:
                rel = parse_qs(parts.query).get("d", [""])[0]
                return self._from_local_root(rel), "", None
            if path.startswith("/data/upload/") and self._cache is not None:
                cached = self._cache.read(url)
                if cached is not None:
                    return cached, "", None
                data, content_type = self._downloader.download(url)
                return data, content_type, url
        return (*self._downloader.download(url), None)

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
        return self._downloader.download(f"{self.ls_url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}")[0]
