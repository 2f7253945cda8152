"""Bounds of one ``/predict``: decoded pixels held at once, and whether the batch fits Label Studio's wait.

Two per-process objects, both thread-safe:

- :class:`PixelBudget` (one per request): a load reserves the worst case (``IMAGE_MAX_PIXELS``) before it
  downloads, keeps only the real size once decoded, and gives it back when its task is drafted. Images
  held at once therefore never exceed ``PREDICT_MAX_PIXELS`` (one image is always admitted, however
  large), whatever the batch size: backpressure, no task is refused (README, *Memory and time bounds*).
- :class:`LatencyModel` (one per process): exponentially weighted means of what a task costs here, per
  detector (seconds of one Gemini call, retries included; seconds of YOLO per task) and how often the
  first detector needs the fallback. :func:`plan` turns them into "answer inline" or "draft in the
  background" for a batch of ``n`` tasks, against Label Studio's ``/predict`` timeout with a margin.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


class PixelBudget:
    """A counting semaphore in pixels, granted in ticket order; :meth:`close` wakes every waiter.

    Tickets (the task index, each used once) make loads get room in task order: the Gemini calls start
    in task order too, so an image that holds room always has its call running or next, never queued
    behind a call that waits for a load that waits for room (a deadlock with a first-come grant).
    """

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self.peak = 0
        self.closed = False
        self._next = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int, ticket: int | None = None) -> bool:
        """Wait for ``ticket``'s turn and until ``pixels`` fit (or nothing is held); False once closed."""
        with self._cond:
            while not self.closed and ((ticket is not None and ticket != self._next)
                                       or (self.used > 0 and self.used + pixels > self.limit)):
                self._cond.wait()
            if self.closed:
                return False
            if ticket is not None:
                self._next += 1
                self._cond.notify_all()
            self.used += pixels
            self.peak = max(self.peak, self.used)
            return True

    def release(self, pixels: int) -> None:
        with self._cond:
            self.used = max(0, self.used - pixels)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


#: Weight of the newest sample in the moving averages (about the last ten batches count).
EWMA_ALPHA = 0.2


class LatencyModel:
    """Measured per-task cost in this process; starts from the pessimistic priors until measured."""

    def __init__(self, gemini_prior_s: float, yolo_prior_s: float = 1.0):
        self._lock = threading.Lock()
        self.seconds = {"gemini": float(gemini_prior_s), "yolo": float(yolo_prior_s)}
        self.measured = {"gemini": False, "yolo": False}
        self.fallback_share = 0.0

    def observe(self, source: str, seconds: float) -> None:
        """One task's (Gemini: one call's) wall time; the first sample replaces the prior."""
        with self._lock:
            if not self.measured.get(source):
                self.seconds[source], self.measured[source] = float(seconds), True
            else:
                self.seconds[source] += EWMA_ALPHA * (float(seconds) - self.seconds[source])

    def observe_fallbacks(self, share: float) -> None:
        """Share of a batch's tasks the first detector could not serve."""
        with self._lock:
            self.fallback_share += EWMA_ALPHA * (min(1.0, max(0.0, share)) - self.fallback_share)

    def snapshot(self) -> tuple[float, float, float]:
        with self._lock:
            return self.seconds["gemini"], self.seconds["yolo"], self.fallback_share


@dataclass(frozen=True)
class Plan:
    inline: bool
    estimate_s: float
    budget_s: float


def estimate(n: int, order: list[str], gemini_s: float, yolo_s: float, fallback_share: float, concurrency: int) -> float:
    """Seconds ``n`` tasks take: Gemini calls run ``concurrency`` at a time (waves), YOLO one task after another."""
    waves = math.ceil(n / max(1, concurrency))
    cost = {"gemini": waves * gemini_s, "yolo": n * yolo_s}
    first, rest = order[0], order[1:]
    return cost[first] + sum(fallback_share * cost[source] for source in rest)


def plan(n: int, order: list[str], model: LatencyModel, concurrency: int, timeout_s: float, inline_share: float) -> Plan:
    """Answer inline only when the estimate fits ``inline_share`` of Label Studio's timeout (the margin).

    One task is always answered inline: it is an annotator waiting (interactive mode, a task opened), and
    the deadline still bounds it.
    """
    gemini_s, yolo_s, share = model.snapshot()
    cost = estimate(n, order, gemini_s, yolo_s, share, concurrency)
    budget = timeout_s * inline_share
    return Plan(n <= 1 or cost <= budget, cost, budget)
