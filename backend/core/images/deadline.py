"""A wall-clock deadline for one image fetch: DNS, connect, TLS, every redirect and the body together.

Why hand-written: requests' and urllib3's timeouts bound each socket operation, not the exchange
(urllib3's ``Timeout(total=)`` too: its read part applies per ``recv``), so a server that sends one
byte every 0.2 s keeps a fetch alive for as long as it likes, headers or body. Here a timer shuts
down every socket the fetch uses when the deadline passes: the blocked read returns at once and
the downloader reports ``timeout``. The guarded connections (:mod:`backend.core.images.ssrf`)
hand their sockets to the deadline active in their thread. Each socket is watched through a
duplicate descriptor owned here and closed when the fetch ends, so a late timer can never shut a
descriptor number the process has reused for something else.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextvars import ContextVar, Token

_current: ContextVar[Deadline | None] = ContextVar("image_fetch_deadline", default=None)


class Deadline:
    """``with Deadline(seconds) as d:`` arms the watchdog for the code inside, in this thread."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._done = False
        self._token: Token[Deadline | None] | None = None
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes (at once if it has passed already)."""
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return  # already closed: nothing left to interrupt
        with self._lock:
            if not self._done:
                self._watched.append(dup)
                if self.expired:
                    _shutdown(dup)
                return
        dup.close()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._watched:
                _shutdown(sock)

    def __enter__(self) -> Deadline:
        self._token = _current.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        assert self._token is not None
        _current.reset(self._token)
        with self._lock:
            self._done = True
            watched, self._watched = self._watched, []
        for sock in watched:
            sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer or the fetch closed it first


def current_deadline() -> Deadline | None:
    """The deadline of the fetch running in this thread, if any."""
    return _current.get()
