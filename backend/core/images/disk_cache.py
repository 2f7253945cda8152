"""On-disk cache of Label Studio uploads, keyed by their absolute URL.

LS uploads are immutable, so a hit needs no revalidation. The key is the absolute URL, so two Label
Studio hosts never share entries. Entries are written only after the bytes decoded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from backend.core.files import write_atomic

log = logging.getLogger(__name__)


class UploadCache:
    """One file per URL under ``folder``; entries larger than ``max_bytes`` are ignored."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def _path(self, url: str) -> Path:
        return self.folder / hashlib.sha256(url.encode()).hexdigest()

    def read(self, url: str) -> bytes | None:
        """The cached bytes of ``url``, or None (miss, too large, unreadable)."""
        path = self._path(url)
        try:
            if path.stat().st_size <= self.max_bytes:
                return path.read_bytes()
        except OSError:
            pass
        return None

    def write(self, url: str, data: bytes) -> None:
        """Atomic (temp file + rename): a concurrent reader sees the whole file or none."""
        try:
            write_atomic(self._path(url), data, durable=False)  # a cache: losing an entry in a crash is fine
        except OSError as exc:
            log.debug("image cache write failed: %s", exc)
