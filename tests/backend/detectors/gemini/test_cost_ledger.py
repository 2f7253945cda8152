"""The day's Gemini spend outlives Redis: every call is also added to a ledger on disk that restores it."""

from __future__ import annotations

import threading

import pytest

from backend.core.settings import Settings
from backend.detectors.gemini.cost import CostTracker, SpendLedger, Usage

DAY = 1_750_000_000.0  # 2025-06-15T15:06:40Z
BIG = Usage(10_000, 1_000, 0)  # $0.0055


def settings(tmp_path, **kw) -> Settings:
    return Settings(gemini_price_input_per_m=0.30, gemini_price_output_per_m=2.50, model_dir=tmp_path / "models", **kw)


def test_a_flushed_day_key_is_restored_from_the_ledger_so_the_budget_holds(rdb, tmp_path):
    client, prefix = rdb
    s = settings(tmp_path, gemini_daily_budget_usd=0.01)
    tracker = CostTracker(s, client, prefix=prefix, clock=lambda: DAY)
    assert tracker.ledger is not None and tracker.ledger.folder.is_relative_to(tmp_path / "models" / ".spend")
    tracker.record("m", BIG)
    tracker.record("m", BIG)
    assert tracker.budget_exhausted()
    client.delete(tracker.day_key())  # the day's key is gone: FLUSHALL, or Redis restored from last night
    fresh = CostTracker(s, client, prefix=prefix, clock=lambda: DAY)  # another replica, or after a restart
    assert fresh.spent_today() == pytest.approx(0.011) and fresh.budget_exhausted()
    assert float(client.get(tracker.day_key())) == pytest.approx(0.011)  # Redis has it again
    client.delete(tracker.day_key())
    fresh.record("m", BIG)  # a call lands first: Redis restarts from the ledger, not from zero
    assert float(client.get(tracker.day_key())) == pytest.approx(0.0165)
    assert 0 < client.ttl(tracker.day_key()) <= 3 * 24 * 3600


def test_the_ledger_adds_up_across_threads_and_forgets_old_days(tmp_path):
    ledger = SpendLedger(tmp_path / "spend")

    def add():
        for _ in range(25):
            ledger.add("2025-06-15", 0.001)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert ledger.total("2025-06-15") == pytest.approx(0.2)  # no lost update
    assert ledger.add("2025-06-23", 0.5) == pytest.approx(0.5)  # a new day starts ...
    assert not ledger.path("2025-06-15").exists() and ledger.total("2025-06-15") == 0.0  # ... week-old files go


def test_an_unwritable_ledger_does_not_stop_recording(rdb, tmp_path):
    client, prefix = rdb
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    tracker = CostTracker(settings(tmp_path), client, prefix=prefix, clock=lambda: DAY, ledger=SpendLedger(blocked / "spend"))
    tracker.record("m", BIG)
    assert tracker.spent_today() == pytest.approx(0.0055)
