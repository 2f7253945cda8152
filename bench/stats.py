"""Statistics and timing for the benchmarks: percentiles, a summary of samples, formatting, repeats."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100."""
    if not samples:
        return float("nan")
    data = sorted(samples)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class Stats:
    n: int
    median: float
    min: float
    max: float
    mean: float
    p95: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        samples = [float(s) for s in samples]
        if not samples:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(len(samples), statistics.median(samples), min(samples), max(samples), statistics.fmean(samples),
                   percentile(samples, 95), percentile(samples, 99))

    @property
    def p50(self) -> float:
        return self.median

    def spread(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        """``median (min–max, n=N)`` in the given unit."""
        low, high = fmt(self.min * scale, digits), fmt(self.max * scale, digits)
        return f"{fmt(self.median * scale, digits)}{unit} ({low}–{high}, n={self.n})"


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def repeat(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(n)]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
