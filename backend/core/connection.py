"""The one place that builds Redis clients, and the "log once while Redis is down" helper.

Clients return bytes (``decode_responses`` stays off): RQ pickles into Redis and needs raw bytes,
and sharing one client type keeps every caller honest about decoding.
"""

from __future__ import annotations

import logging
import threading

import redis as redis_lib

#: A web route must never hang on Redis: Label Studio gives /predict about a second.
WEB_TIMEOUT_S = 0.5
#: Shared Gemini state (cache, spend, breaker): a slow answer still beats paying Gemini twice.
SHARED_STATE_TIMEOUT_S = 2.0
#: Workers and the CLI: long operations are fine, hanging forever is not.
PATIENT_TIMEOUT_S = 30.0


def connect(url: str, timeout: float | None = WEB_TIMEOUT_S, *, connect_timeout: float | None = None,
            health_check_interval: int = 30) -> redis_lib.Redis:
    """A client for ``url`` (no round trip yet). ``timeout`` bounds every read; ``None`` waits forever.

    ``connect_timeout`` defaults to ``timeout``; the health check re-pings an idle connection before
    reuse, so a Redis restart costs one reconnect rather than one failed call.
    """
    return redis_lib.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout if connect_timeout is None else connect_timeout,
        health_check_interval=health_check_interval,
    )


def connect_patient(url: str, timeout: float = PATIENT_TIMEOUT_S) -> redis_lib.Redis:
    """The worker/CLI variant: a longer read timeout, still a quick failure when Redis is not there."""
    return connect(url, timeout, connect_timeout=min(timeout, 5.0))


class OutageLog:
    """Logs a warning once when Redis goes away and an info line once it is back (thread-safe).

    For code that keeps working without Redis (cache, cost ledger, breaker): one line per outage
    instead of one per call.
    """

    def __init__(self, logger: logging.Logger, down: str, back: str) -> None:
        self._logger = logger
        self._down_message = down
        self._back_message = back
        self._failed = False
        self._lock = threading.Lock()

    @property
    def failed(self) -> bool:
        return self._failed

    def down(self, exc: BaseException) -> None:
        """Redis failed: warn if it was fine until now."""
        with self._lock:
            first, self._failed = not self._failed, True
        if first:
            self._logger.warning("%s: %s", self._down_message, exc)

    def up(self) -> None:
        """Redis answered: say so if it had failed."""
        with self._lock:
            was, self._failed = self._failed, False
        if was:
            self._logger.info("%s", self._back_message)
