"""A circuit breaker for Gemini, shared by every process through Redis.

When Gemini is down or out of quota every task would otherwise wait out its whole deadline
before falling back to YOLO. After ``failures`` consecutive failed tasks the breaker opens: tasks
skip Gemini at once for ``cooldown`` seconds. Then it is half-open: exactly one task (across all
processes, via ``SET NX``) may try; its success closes the breaker, its failure re-opens it for
another cooldown. The trial holds a lease, so a process that dies mid-trial cannot wedge it.

State lives in Redis when given (all replicas trip together) and in memory otherwise, or while
Redis is unreachable (logged once per outage).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

import redis as redis_lib

from backend.core import keys
from backend.core.connection import OutageLog

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]


class _MemoryState:
    def __init__(self) -> None:
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_until = 0.0
        self.lock = threading.Lock()

    def allow(self, now: float, cooldown: float, lease: float) -> bool:
        with self.lock:
            if self.opened_at is None:
                return True
            if now - self.opened_at < cooldown or now < self.trial_until:
                return False
            self.trial_until = now + lease
            return True

    def success(self) -> None:
        with self.lock:
            self.failures, self.opened_at, self.trial_until = 0, None, 0.0

    def failure(self, now: float, threshold: int, cooldown: float) -> None:
        with self.lock:
            if self.opened_at is not None:
                if now - self.opened_at >= cooldown:  # the half-open trial failed
                    self.opened_at, self.trial_until = now, 0.0
                return
            self.failures += 1
            if self.failures >= threshold:
                self.opened_at = now

    def state(self, now: float, cooldown: float) -> State:
        with self.lock:
            if self.opened_at is None:
                return "closed"
            return "open" if now - self.opened_at < cooldown else "half_open"


class _RedisState:
    def __init__(self, redis: redis_lib.Redis, prefix: str) -> None:
        self.redis = redis
        self.failures_key = keys.Keys.BREAKER_FAILURES.format(prefix=prefix)
        self.opened_key = keys.Keys.BREAKER_OPENED_AT.format(prefix=prefix)
        self.trial_key = keys.Keys.BREAKER_TRIAL.format(prefix=prefix)

    def _opened_at(self) -> float | None:
        value = self.redis.get(self.opened_key)
        return float(value) if value is not None else None

    def allow(self, now: float, cooldown: float, lease: float) -> bool:
        opened = self._opened_at()
        if opened is None:
            return True
        if now - opened < cooldown:
            return False
        return bool(self.redis.set(self.trial_key, str(now), nx=True, px=max(1, int(lease * 1000))))

    def success(self) -> None:
        self.redis.delete(self.failures_key, self.opened_key, self.trial_key)

    def failure(self, now: float, threshold: int, cooldown: float) -> None:
        opened = self._opened_at()
        if opened is not None:
            if now - opened >= cooldown:  # the half-open trial failed: open again
                pipe = self.redis.pipeline()
                pipe.set(self.opened_key, repr(now))
                pipe.delete(self.trial_key)
                pipe.execute()
            return
        pipe = self.redis.pipeline()
        pipe.incr(self.failures_key)
        pipe.expire(self.failures_key, 24 * 3600)
        count = int(pipe.execute()[0])
        if count >= threshold:
            self.redis.set(self.opened_key, repr(now), nx=True)

    def state(self, now: float, cooldown: float) -> State:
        opened = self._opened_at()
        if opened is None:
            return "closed"
        return "open" if now - opened < cooldown else "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker; call :meth:`allow` before a task, then record its outcome."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        redis: redis_lib.Redis | None = None,
        prefix: str = keys.gemini_breaker(),
        trial_lease: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.threshold = max(1, int(failures))
        self.cooldown = float(cooldown)
        self.trial_lease = float(trial_lease)
        self._clock = clock  # wall clock: comparable across processes and hosts
        self._memory = _MemoryState()
        self._redis = _RedisState(redis, prefix) if redis is not None else None
        self._outage = OutageLog(log, "breaker: Redis unavailable, using this process's own state",
                                 "breaker: Redis is back, breaker state is shared again")

    def _run(self, method: str, *args: object):
        if self._redis is not None:
            try:
                result = getattr(self._redis, method)(*args)
            except redis_lib.RedisError as exc:
                self._outage.down(exc)
            else:
                self._outage.up()
                return result
        return getattr(self._memory, method)(*args)

    def allow(self) -> bool:
        """May a task call Gemini now? False while open; in half-open only for the one trial."""
        return bool(self._run("allow", self._clock(), self.cooldown, self.trial_lease))

    def record_success(self) -> None:
        """Gemini answered: close the breaker and reset the failure count."""
        self._run("success")

    def record_failure(self) -> None:
        """A task failed on Gemini's side (timeouts, 429, 5xx, auth)."""
        self._run("failure", self._clock(), self.threshold, self.cooldown)

    @property
    def state(self) -> State:
        return self._run("state", self._clock(), self.cooldown)
