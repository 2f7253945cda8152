"""Lever 3: spend per tier, drafts per source and the cost per 1,000 drafted tasks, shared through Redis."""

from __future__ import annotations

import pytest

from backend.core.settings import Settings
from backend.detectors.gemini.cost import CostTracker, Usage, money_gauges


def test_tier_prices_and_cost_per_1000_tasks(rdb, tmp_path):
    client, prefix = rdb
    settings = Settings(model_dir=tmp_path, gemini_price_flex_factor=0.5, gemini_price_batch_factor=0.4,
                        gemini_price_input_per_m=1.0, gemini_price_output_per_m=2.0)
    tracker = CostTracker(settings, client, prefix=f"{prefix}:spend")
    usage = Usage(1_000_000, 500_000)
    assert tracker.cost_usd(usage) == pytest.approx(2.0)
    assert tracker.cost_usd(usage, "flex") == pytest.approx(1.0)
    assert tracker.cost_usd(usage, "batch") == pytest.approx(0.8)
    assert tracker.cost_usd(usage, "cache") == 0.0

    tracker.record("m", usage, "standard")
    # A batch's results, read twice (a poll resumed after a dead worker reads them again): neither charged
    # nor tallied; the batch enters the day's spend at submission and the lifetime tally once, when settled.
    tracker.record("m", usage, "batch", charge=False)
    tracker.record("m", usage, "batch", charge=False)
    for source in ("gemini:standard", "gemini:batch", "yolo", "yolo"):
        tracker.count_task(source)
    assert tracker.spent_today() == pytest.approx(2.0)
    assert tracker.money() == {"usd:standard": pytest.approx(2.0), "tasks:gemini:standard": 1,
                               "tasks:gemini:batch": 1, "tasks:yolo": 2}
    reserved = tracker.reserve(1.5)
    assert tracker.spent_today() == pytest.approx(3.5)
    tracker.settle(reserved, 0.8)
    assert tracker.spent_today() == pytest.approx(2.8)

    other = CostTracker(settings, client, prefix=f"{prefix}:spend")  # another process sees the same tally
    families = {f.name: f for f in money_gauges(other)}
    spend = {s.labels["tier"]: s.value for s in families["lsb_gemini_spend_by_tier_usd"].samples}
    tasks = {s.labels["source"]: s.value for s in families["lsb_drafted_tasks"].samples}
    assert spend == pytest.approx({"standard": 2.0, "batch": 0.8})
    assert tasks == {"gemini:standard": 1, "gemini:batch": 1, "yolo": 2}
    assert families["lsb_cost_per_1000_drafted_tasks_usd"].samples[0].value == pytest.approx(1000 * 2.8 / 4)
    assert money_gauges(None)[2].samples[0].value == 0.0
