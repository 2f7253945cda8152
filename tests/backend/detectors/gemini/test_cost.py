"""Token accounting, USD estimates and the daily budget shared through Redis."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis
from google.genai import types
from prometheus_client import REGISTRY

from backend.core.settings import Settings
from backend.detectors.gemini.cost import CostTracker, Usage, cost_per_1000, project_money_tally

DOWN_URL = "redis://127.0.0.1:1/15"  # nothing listens there
DAY = 1_750_000_000.0  # 2025-06-15T15:06:40Z




def settings(**kw) -> Settings:
    kw.setdefault("gemini_price_input_per_m", 0.30)
    kw.setdefault("gemini_price_output_per_m", 2.50)
    return Settings(**kw)


def sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_cost_counts_thinking_as_output():
    tracker = CostTracker(settings())
    assert tracker.cost_usd(Usage(1_000_000, 0, 0)) == pytest.approx(0.30)
    assert tracker.cost_usd(Usage(0, 1_000_000, 0)) == pytest.approx(2.50)
    assert tracker.cost_usd(Usage(1000, 200, 300)) == pytest.approx((1000 * 0.30 + 500 * 2.50) / 1e6)


def test_usage_from_sdk_metadata():
    meta = types.GenerateContentResponseUsageMetadata(prompt_token_count=258, candidates_token_count=40, thoughts_token_count=7,
                                                      total_token_count=305)
    assert Usage.from_metadata(meta) == Usage(258, 40, 7)
    assert Usage.from_metadata(types.GenerateContentResponseUsageMetadata(prompt_token_count=5)) == Usage(5, 0, 0)
    assert Usage.from_metadata(None) == Usage()
    assert Usage.from_dict(Usage(1, 2, 3).to_dict()) == Usage(1, 2, 3)


def test_record_feeds_metrics_by_model():
    model = f"model-{uuid.uuid4().hex[:8]}"
    CostTracker(settings()).record(model, Usage(1000, 100, 50))
    assert sample("lsb_gemini_tokens_total", {"model": model, "kind": "input"}) == 1000
    assert sample("lsb_gemini_tokens_total", {"model": model, "kind": "output"}) == 100
    assert sample("lsb_gemini_tokens_total", {"model": model, "kind": "thinking"}) == 50
    assert sample("lsb_gemini_cost_usd_total", {"model": model}) == pytest.approx((1000 * 0.3 + 150 * 2.5) / 1e6)


def test_spend_is_shared_between_replicas_and_stops_both(rdb):
    client, prefix = rdb
    s = settings(gemini_daily_budget_usd=0.01)
    a = CostTracker(s, client, prefix=prefix, clock=lambda: DAY)
    b = CostTracker(s, client, prefix=prefix, clock=lambda: DAY)
    big = Usage(10_000, 1_000, 0)  # $0.0055
    a.record("m", big)
    assert not a.budget_exhausted() and not b.budget_exhausted()
    b.record("m", big)
    assert a.spent_today() == pytest.approx(0.011)
    assert a.budget_exhausted() and b.budget_exhausted()
    key = a.day_key()
    assert key == f"{prefix}:2025-06-15"
    assert 0 < client.ttl(key) <= 3 * 24 * 3600


def test_budget_resets_on_a_new_utc_day(rdb):
    client, prefix = rdb
    now = [DAY]
    tracker = CostTracker(settings(gemini_daily_budget_usd=0.001), client, prefix=prefix, clock=lambda: now[0])
    tracker.record("m", Usage(0, 1_000, 0))
    assert tracker.budget_exhausted()
    now[0] += 24 * 3600
    assert tracker.spent_today() == 0.0 and not tracker.budget_exhausted()


def test_zero_budget_means_unlimited(rdb):
    client, prefix = rdb
    tracker = CostTracker(settings(gemini_daily_budget_usd=0.0), client, prefix=prefix)
    tracker.record("m", Usage(10_000_000, 10_000_000, 0))
    assert tracker.spent_today() > 20 and not tracker.budget_exhausted()


def test_without_redis_the_budget_holds_per_process():
    tracker = CostTracker(settings(gemini_daily_budget_usd=0.001))
    tracker.record("m", Usage(0, 1_000, 0))
    assert tracker.spent_today() == pytest.approx(0.0025) and tracker.budget_exhausted()


def test_redis_outage_is_not_an_error_and_is_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="backend.detectors.gemini.cost")
    tracker = CostTracker(settings(gemini_daily_budget_usd=0.001), redis.Redis.from_url(DOWN_URL, socket_connect_timeout=0.2),
                          prefix="test:cost:down")
    tracker.record("m", Usage(0, 300, 0))
    assert not tracker.budget_exhausted()
    tracker.record("m", Usage(0, 300, 0))
    assert tracker.budget_exhausted()  # falls back to this process's tally
    assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 1


def test_count_task_keeps_a_tally_per_project_beside_the_global_one(rdb):
    client, prefix = rdb
    tracker = CostTracker(settings(), client, prefix=f"{prefix}:spend")
    tracker.count_task("gemini:standard", 7, 0.002)
    tracker.count_task("gemini:flex", "07", 0.001)  # the same project, however the id arrives
    tracker.count_task("gemini:cache", 7, 0.0)
    tracker.count_task("yolo", 7)
    tracker.count_task("yolo", 8)
    tracker.count_task("gemini:standard")  # no project known: the global tally only

    seven = project_money_tally(client, 7, root=prefix)
    assert seven == pytest.approx({"tasks:gemini:standard": 1, "tasks:gemini:flex": 1, "tasks:gemini:cache": 1,
                                   "tasks:yolo": 1, "usd:standard": 0.002, "usd:flex": 0.001})
    assert project_money_tally(client, 8, root=prefix) == {"tasks:yolo": 1}
    assert project_money_tally(client, 9, root=prefix) == {}
    assert tracker.money() == {"tasks:gemini:standard": 2, "tasks:gemini:flex": 1, "tasks:gemini:cache": 1, "tasks:yolo": 2}
    assert cost_per_1000(seven) == pytest.approx(1000 * 0.003 / 4)
    assert cost_per_1000({}) is None
    CostTracker(settings()).count_task("yolo", 7)  # without Redis: nothing to keep, nothing raised
