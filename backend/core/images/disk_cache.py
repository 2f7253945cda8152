"""On-disk cache of Label Studio uploads, keyed by their absolute URL.

LS uploads are immutable, so a hit needs no revalidation. The key is the absolute URL, so two Label
Studio hosts never share entries. Entries are written only after the bytes decoded.

The folder is bounded (``IMAGE_CACHE_MAX_MB``): a hit refreshes its file's mtime, and when the
folder outgrows its limit the least recently used files are deleted down to 90 % of it. Each
process counts its own writes and rescans the folder after every tenth of the limit written, so
several processes sharing the folder overshoot by at most a tenth of the limit each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from backend.core.files import write_atomic

log = logging.getLogger(__name__)


DEFAULT_MAX_TOTAL_BYTES = 2048 * 1024 * 1024
PRUNE_TO = 0.9  # an eviction leaves the folder at this share of its limit, so it does not run on every write


class UploadCache:
    """One file per URL under ``folder``; entries larger than ``max_bytes`` are ignored; the folder
    holds at most ``max_total_bytes`` (least recently used files evicted first)."""

    def __init__(self, folder: Path, max_bytes: int, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_total_bytes = max(1, int(max_total_bytes))
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes in the folder as this process knows it; None until scanned
        self._since_scan = 0

    def _path(self, url: str) -> Path:
        return self.folder / hashlib.sha256(url.encode()).hexdigest()

    def read(self, url: str) -> bytes | None:
        """The cached bytes of ``url``, or None (miss, too large, unreadable)."""
        path = self._path(url)
        try:
            if path.stat().st_size <= self.max_bytes:
                data = path.read_bytes()
                os.utime(path)  # recently used: the last to be evicted
                return data
        except OSError:  # a miss, or evicted by another process between stat and read
            pass
        return None

    def write(self, url: str, data: bytes) -> None:
        """Atomic (temp file + rename): a concurrent reader sees the whole file or none."""
        if len(data) > min(self.max_bytes, self.max_total_bytes):
            return
        try:
            write_atomic(self._path(url), data, durable=False)  # a cache: losing an entry in a crash is fine
        except OSError as exc:
            log.debug("image cache write failed: %s", exc)
            return
        with self._lock:
            self._since_scan += len(data)
            if self._total is not None:
                self._total += len(data)
            due = self._total is None or self._total > self.max_total_bytes or self._since_scan * 10 >= self.max_total_bytes
        if due:
            self.prune()

    def prune(self) -> int:
        """Delete the least recently used files until the folder is under its limit; returns its bytes.

        Only one thread of a process scans at a time; processes sharing the folder may both delete
        (a file already gone is skipped).
        """
        with self._lock:
            try:
                entries = []
                with os.scandir(self.folder) as scan:
                    for entry in scan:
                        if entry.name.startswith("."):  # another writer's temp file
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        entries.append((st.st_mtime_ns, st.st_size, entry.path))
            except OSError as exc:
                log.debug("image cache scan failed: %s", exc)
                return self._total or 0
            total = sum(size for _, size, _ in entries)
            if total > self.max_total_bytes:
                target = int(self.max_total_bytes * PRUNE_TO)
                evicted = 0
                for _, size, path in sorted(entries):
                    if total <= target:
                        break
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        log.debug("image cache eviction failed: %s", exc)
                        continue
                    total -= size
                    evicted += 1
                log.info("image cache: evicted %d least recently used files, %d bytes left (limit %d)",
                         evicted, total, self.max_total_bytes)
            self._total, self._since_scan = total, 0
            return total
