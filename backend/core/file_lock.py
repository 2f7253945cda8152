"""An exclusive lock on a file, across threads, processes and hosts that share the file system.

``fcntl.flock`` on a file opened for this acquisition only: two acquisitions conflict even inside one
process (each has its own open file description), and Linux maps flock to POSIX locks on NFS, so
hosts that share ``MODEL_DIR`` exclude each other too. The kernel drops the lock when its holder dies,
so a crash never leaves a stale lock behind (unlike a lock file or a Redis key with a TTL).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_S = 0.01


class LockTimeout(TimeoutError):
    """Somebody held the lock for longer than the caller was willing to wait."""


@contextmanager
def file_lock(path: Path | str, timeout: float = 60.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the body; wait at most ``timeout``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path} stayed locked for more than {timeout:.0f}s") from None
                time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
