"""Gemini token accounting, USD estimate and the daily budget shared by every replica.

Spend is accumulated per UTC day with ``INCRBYFLOAT`` on one Redis key, so all processes and
hosts see the same total and the budget stops them together. Without Redis (or while it is
down) the tally is kept in this process only: the budget then holds per process, which is the
best that can be done and is logged once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis as redis_lib

from backend.core import keys
from backend.core.connection import OutageLog
from backend.core.metrics import GEMINI_COST, GEMINI_TOKENS
from backend.core.settings import Settings

log = logging.getLogger(__name__)

DAY_KEY_TTL = 3 * 24 * 3600  # keep yesterday's total around for dashboards, then expire


@dataclass(frozen=True)
class Usage:
    """Tokens of one call. Thinking tokens are billed as output tokens."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0

    @classmethod
    def from_metadata(cls, metadata: Any) -> Usage:
        """From google-genai's ``usage_metadata`` (any missing count is 0)."""
        if metadata is None:
            return cls()
        return cls(
            int(getattr(metadata, "prompt_token_count", None) or 0),
            int(getattr(metadata, "candidates_token_count", None) or 0),
            int(getattr(metadata, "thoughts_token_count", None) or 0),
        )

    @classmethod
    def from_dict(cls, data: dict | None) -> Usage:
        data = data or {}
        return cls(int(data.get("prompt_tokens", 0)), int(data.get("output_tokens", 0)), int(data.get("thinking_tokens", 0)))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.output_tokens + self.thinking_tokens


def _utc_day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


class CostTracker:
    """Counts tokens and spend by model; answers whether today's budget is used up. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        redis: redis_lib.Redis | None = None,
        prefix: str = keys.gemini_spend(),
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.price_in = settings.gemini_price_input_per_m
        self.price_out = settings.gemini_price_output_per_m
        self.budget = settings.gemini_daily_budget_usd
        self._redis = redis
        self._prefix = prefix
        self._clock = clock or time.time
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()
        self._outage = OutageLog(log, "cost: Redis unavailable, the budget is tracked per process until it returns",
                                 "cost: Redis is back, spend is shared again")

    def cost_usd(self, usage: Usage) -> float:
        """Estimated USD of one call from the configured per-million prices."""
        return (usage.prompt_tokens * self.price_in + (usage.output_tokens + usage.thinking_tokens) * self.price_out) / 1e6

    def day_key(self, day: str | None = None) -> str:
        return keys.Keys.SPEND_DAY.format(prefix=self._prefix, day=day or _utc_day(self._clock()))

    def record(self, model: str, usage: Usage) -> float:
        """Count a billed call: token and cost metrics, today's shared spend. Returns its USD."""
        cost = self.cost_usd(usage)
        GEMINI_TOKENS.labels(model=model, kind="input").inc(usage.prompt_tokens)
        GEMINI_TOKENS.labels(model=model, kind="output").inc(usage.output_tokens)
        GEMINI_TOKENS.labels(model=model, kind="thinking").inc(usage.thinking_tokens)
        GEMINI_COST.labels(model=model).inc(cost)
        if cost <= 0:
            return cost
        key = self.day_key()
        with self._lock:
            self._local[key] = self._local.get(key, 0.0) + cost
        if self._redis is not None:
            try:
                pipe = self._redis.pipeline()
                pipe.incrbyfloat(key, cost)
                pipe.expire(key, DAY_KEY_TTL)
                pipe.execute()
                self._outage.up()
            except redis_lib.RedisError as exc:
                self._outage.down(exc)
        return cost

    def spent_today(self) -> float:
        """USD spent today (UTC): the shared Redis total, else this process's own."""
        key = self.day_key()
        if self._redis is not None:
            try:
                value = self._redis.get(key)
                self._outage.up()
                return float(value or 0.0)
            except redis_lib.RedisError as exc:
                self._outage.down(exc)
        with self._lock:
            return self._local.get(key, 0.0)

    def budget_exhausted(self) -> bool:
        """True once a daily budget is set and today's spend reached it."""
        return self.budget > 0 and self.spent_today() >= self.budget
