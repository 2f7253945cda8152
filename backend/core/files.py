"""Atomic file writes: a reader (or a crash) sees the old file or the whole new one, never a part.

The content goes to a hidden temp file in the target's folder (same file system, so the rename is
atomic), is fsynced, then ``os.replace``-d over the target. A failure at any point removes the temp
file and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_from(path: Path, fill, *, durable: bool) -> None:
    """Create a temp file next to ``path``, let ``fill(fh)`` write it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill must not leave a temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: bytes | str, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically. ``durable=False`` skips the fsync (caches only)."""
    payload = data.encode() if isinstance(data, str) else data
    _replace_from(Path(path), lambda fh: fh.write(payload), durable=durable)


def write_json_atomic(path: Path | str, doc: Any, *, indent: int | None = 2) -> None:
    """``doc`` as JSON (``default=str`` for paths and times), written atomically and durably."""
    write_atomic(path, json.dumps(doc, indent=indent, default=str))


def copy_atomic(source: Path | str, path: Path | str) -> None:
    """Copy ``source`` to ``path`` atomically and durably (checkpoints, fonts)."""
    with open(source, "rb") as src:
        _replace_from(Path(path), lambda fh: shutil.copyfileobj(src, fh, 1024 * 1024), durable=True)
