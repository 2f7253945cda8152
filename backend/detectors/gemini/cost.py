"""Gemini token accounting, USD estimate and the daily budget shared by every replica.

Spend is accumulated per UTC day with ``INCRBYFLOAT`` on one Redis key, so all processes and
hosts see the same total and the budget stops them together. Without Redis (or while it is
down) the tally is kept in this process only: the budget then holds per process, which is the
best that can be done and is logged once.

A Redis flush (or a restore from an older snapshot) would reset the day's spend and with it the
budget, so every recorded call is also added to a ledger on disk, one small JSON file per day under
``MODEL_DIR/.spend/`` (shared storage, like the models), under a file lock. When the day's Redis key
is missing, it is restored from the ledger before anything is added, so the budget survives.

Each tier has its price: the standard per-token prices times ``GEMINI_PRICE_FLEX_FACTOR`` or
``GEMINI_PRICE_BATCH_FACTOR`` (docs/gemini.md#batch-api-and-flex). A batch is charged when it is
submitted (:meth:`CostTracker.reserve`, an estimate) and settled on its results (:meth:`CostTracker.settle`,
the billed ``usageMetadata``). Lifetime spend per tier and drafted tasks per source are kept in one Redis
hash (``lsb:gemini:money``) so ``/metrics`` shows the cost per 1,000 drafted tasks across every process.
The same tally per project (``lsb:gemini:money:<p>``) is written when a drafted task is counted
(:meth:`CostTracker.count_task`, which the predictor calls with the task's project and its draft's USD):
the Gemini call itself does not know its project, the task does. Calls that drafted no task (a blocked
prompt, an answer that did not parse) are billed in the global hash only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis as redis_lib
from prometheus_client.core import GaugeMetricFamily

from backend.core import keys
from backend.core.connection import OutageLog
from backend.core.file_lock import LockTimeout, file_lock
from backend.core.files import write_json_atomic
from backend.core.metrics import GEMINI_COST, GEMINI_TIER_COST, GEMINI_TOKENS
from backend.core.settings import Settings

log = logging.getLogger(__name__)

DAY_KEY_TTL = 3 * 24 * 3600  # keep yesterday's total around for dashboards, then expire
LEDGER_DAYS = 7  # ledger files older than this are deleted when a new day starts
LEDGER_LOCK_S = 5.0

#: Add to the day's total; a missing key (flushed Redis) first takes the ledger's total, which already
#: counts this call, so it is set to that instead of incremented.
_ADD_SPEND = """
local value
if redis.call('EXISTS', KEYS[1]) == 0 then
  value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[2])
else
  value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return value
"""


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


def tier_factors(settings: Settings) -> dict[str, float]:
    """Price of each tier as a share of standard (the configurable table, README and docs/gemini.md)."""
    return {"standard": 1.0, "flex": settings.gemini_price_flex_factor, "batch": settings.gemini_price_batch_factor,
            "cache": 0.0}


def _utc_day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


class SpendLedger:
    """The day's spend on disk, one JSON file per UTC day, added to under a file lock (every process and
    host that shares the folder). It outlives Redis: a flushed day key is restored from it."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._outage = OutageLog(log, "cost: the spend ledger on disk is not writable; a Redis flush would reset the budget",
                                 "cost: the spend ledger on disk is writable again")

    def path(self, day: str) -> Path:
        return self.folder / f"{day}.json"

    def total(self, day: str) -> float:
        try:
            return float(json.loads(self.path(day).read_text())["usd"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def add(self, day: str, usd: float) -> float | None:
        """Add ``usd`` to the day's total; returns the new total, or None when the disk refused."""
        try:
            with file_lock(self.folder / ".lock", timeout=LEDGER_LOCK_S):
                new_day = not self.path(day).exists()
                total = self.total(day) + usd
                write_json_atomic(self.path(day), {"day": day, "usd": total, "updated_at": time.time()}, indent=None)
                if new_day:
                    self._forget_old(day)
            self._outage.up()
            return total
        except (OSError, LockTimeout) as exc:
            self._outage.down(exc)
            return None

    def _forget_old(self, today: str) -> None:
        cutoff = (dt.date.fromisoformat(today) - dt.timedelta(days=LEDGER_DAYS)).isoformat()
        for old in self.folder.glob("*.json"):
            if old.stem < cutoff:
                old.unlink(missing_ok=True)


class CostTracker:
    """Counts tokens and spend by model; answers whether today's budget is used up. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        redis: redis_lib.Redis | None = None,
        prefix: str = keys.gemini_spend(),
        clock: Callable[[], float] | None = None,
        ledger: SpendLedger | None = None,
    ) -> None:
        """``ledger``: where the spend is also kept on disk; by default ``MODEL_DIR/.spend/<prefix>/``
        when there is a Redis to restore (without Redis there is nothing a ledger would restore)."""
        self.price_in = settings.gemini_price_input_per_m
        self.price_out = settings.gemini_price_output_per_m
        self.factors = tier_factors(settings)
        self.money_root = prefix.rsplit(":", 1)[0] if prefix.endswith(":spend") else prefix
        self.money_key = keys.gemini_money(self.money_root)
        self.budget = settings.gemini_daily_budget_usd
        self._redis = redis
        self._prefix = prefix
        self._clock = clock or time.time
        self._local: dict[str, float] = {}
        if ledger is None and redis is not None:
            ledger = SpendLedger(Path(settings.model_dir) / ".spend" / re.sub(r"[^A-Za-z0-9_.-]", "_", prefix))
        self.ledger = ledger
        self._lock = threading.Lock()
        self._outage = OutageLog(log, "cost: Redis unavailable, the budget is tracked per process until it returns",
                                 "cost: Redis is back, spend is shared again")

    def cost_usd(self, usage: Usage, tier: str = "standard") -> float:
        """Estimated USD of one call from the configured per-million prices at ``tier``'s factor (cache: 0)."""
        standard = (usage.prompt_tokens * self.price_in + (usage.output_tokens + usage.thinking_tokens) * self.price_out) / 1e6
        return standard * self.factors.get(tier, 1.0)

    def day_key(self, day: str | None = None) -> str:
        return keys.Keys.SPEND_DAY.format(prefix=self._prefix, day=day or _utc_day(self._clock()))

    def record(self, model: str, usage: Usage, tier: str = "standard", *, charge: bool = True) -> float:
        """Count a billed call: token and cost metrics, today's shared spend. Returns its USD.

        ``charge=False``: this process's metrics only (a batch's results): the day's spend was charged at
        submission and the lifetime tally gets the batch's cost once, from :meth:`settle`, however many
        polls read the results (a poll resumed after a dead worker reads them all again)."""
        cost = self.cost_usd(usage, tier)
        GEMINI_TOKENS.labels(model=model, kind="input").inc(usage.prompt_tokens)
        GEMINI_TOKENS.labels(model=model, kind="output").inc(usage.output_tokens)
        GEMINI_TOKENS.labels(model=model, kind="thinking").inc(usage.thinking_tokens)
        GEMINI_COST.labels(model=model).inc(cost)
        GEMINI_TIER_COST.labels(tier=tier).inc(cost)
        if charge:
            self._tally(f"usd:{tier}", cost)
            self.charge(cost)
        return cost

    def reserve(self, usd: float) -> float:
        """Charge an estimate now (a batch at submission): the budget sees it before the results come."""
        self.charge(usd)
        return usd

    def settle(self, reserved: float, actual: float, tier: str = "batch") -> None:
        """Replace a reservation by what the results say was billed (may give money back), and add that
        to the lifetime tally under ``tier``. Call it once per batch (the caller's HSETNX ``settled_usd``)."""
        self.charge(actual - reserved)
        self._tally(f"usd:{tier}", actual)

    def count_task(self, source: str, project: str | int | None = None, usd: float = 0.0) -> None:
        """One drafted task by ``source`` (gemini:standard|flex|batch|cache, yolo): the cost per 1,000 drafts.

        With ``project``, also the project's own tally: the task, and ``usd`` (what its draft cost, the
        detections' ``cost_usd``) under the source's tier, so a project's spend per tier sums its drafts."""
        self._tally(f"tasks:{source}", 1)
        if project is None or self._redis is None:
            return
        key = keys.gemini_project_money(project, self.money_root)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrbyfloat(key, f"tasks:{source}", 1)
            if usd:
                pipe.hincrbyfloat(key, f"usd:{source.partition(':')[2] or source}", usd)
            pipe.execute()
        except redis_lib.RedisError as exc:
            self._outage.down(exc)

    def money(self) -> dict[str, float]:
        """Lifetime ``usd:<tier>`` and ``tasks:<source>`` across processes ({} without Redis)."""
        if self._redis is None:
            return {}
        try:
            return money_tally(self._redis, self.money_key)
        except redis_lib.RedisError:
            return {}

    def _tally(self, field: str, amount: float) -> None:
        if self._redis is None or not amount:
            return
        try:
            self._redis.hincrbyfloat(self.money_key, field, amount)
        except redis_lib.RedisError as exc:
            self._outage.down(exc)

    def charge(self, cost: float) -> None:
        """Add ``cost`` USD (negative: a refund of a reservation) to today's shared spend and the ledger."""
        if cost == 0:
            return
        day = _utc_day(self._clock())
        key = self.day_key(day)
        with self._lock:
            self._local[key] = self._local.get(key, 0.0) + cost
        on_disk = self.ledger.add(day, cost) if self.ledger is not None else None
        if self._redis is not None:
            try:
                # a missing day key (Redis flushed) starts from the ledger's total, which includes this call
                self._redis.eval(_ADD_SPEND, 1, key, repr(cost), repr(max(on_disk or 0.0, cost, 0.0)), DAY_KEY_TTL)
                self._outage.up()
            except redis_lib.RedisError as exc:
                self._outage.down(exc)

    def spent_today(self) -> float:
        """USD spent today (UTC): the shared Redis total (restored from the ledger if Redis lost it),
        else this process's own."""
        day = _utc_day(self._clock())
        key = self.day_key(day)
        if self._redis is not None:
            try:
                value = self._redis.get(key)
                self._outage.up()
                if value is None and self.ledger is not None and (on_disk := self.ledger.total(day)) > 0:
                    log.warning("cost: today's spend was missing in Redis (flushed?); restored $%.4f from the ledger", on_disk)
                    self._redis.set(key, repr(on_disk), ex=DAY_KEY_TTL, nx=True)
                    value = self._redis.get(key)
                return float(value or 0.0)
            except redis_lib.RedisError as exc:
                self._outage.down(exc)
        with self._lock:
            return self._local.get(key, 0.0)

    def budget_exhausted(self) -> bool:
        """True once a daily budget is set and today's spend reached it."""
        return self.budget > 0 and self.spent_today() >= self.budget


def money_tally(redis: redis_lib.Redis, key: str | None = None) -> dict[str, float]:
    """The lifetime tally every process adds to (``usd:<tier>``, ``tasks:<source>``); RedisError propagates."""
    raw = redis.hgetall(key or keys.gemini_money())
    return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}


def project_money_tally(redis: redis_lib.Redis, project: str | int, root: str = keys.Keys.GEMINI_ROOT) -> dict[str, float]:
    """One project's lifetime tally (``usd:<tier>``, ``tasks:<source>``), {} before its first draft."""
    return money_tally(redis, keys.gemini_project_money(project, root))


def cost_per_1000(tally: dict[str, float]) -> float | None:
    """USD per 1,000 drafted tasks of a tally (every source counts as a drafted task); None before the first."""
    usd = sum(v for k, v in tally.items() if k.startswith("usd:"))
    drafted = sum(v for k, v in tally.items() if k.startswith("tasks:"))
    return 1000.0 * usd / drafted if drafted else None


def money_gauges(tracker: CostTracker | None) -> list:
    """Scrape-time gauges of the money (issue 16, lever 3), from the shared tally every process adds to:
    lifetime USD per tier, drafted tasks per source and the cost per 1,000 drafted tasks."""
    money = tracker.money() if tracker is not None else {}
    spend = GaugeMetricFamily("lsb_gemini_spend_by_tier_usd", "Lifetime estimated Gemini spend in USD by tier", labels=["tier"])
    tasks = GaugeMetricFamily("lsb_drafted_tasks", "Lifetime drafted tasks by source (gemini:<tier>, yolo)", labels=["source"])
    for field, value in sorted(money.items()):
        kind, _, name = field.partition(":")
        (spend if kind == "usd" else tasks).add_metric([name], value)
    per_1000 = GaugeMetricFamily("lsb_cost_per_1000_drafted_tasks_usd", "Estimated Gemini USD per 1,000 drafted tasks (lifetime)")
    per_1000.add_metric([], cost_per_1000(money) or 0.0)
    return [spend, tasks, per_1000]
