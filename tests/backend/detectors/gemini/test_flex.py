# ruff: noqa: F811 - the factory fixture `make` of test_client.py is imported, then named as an argument
"""The Flex tier of bulk drafting: served at half price, and a timeout, 429 or 503 sends the task to standard."""

from __future__ import annotations

import pytest

from backend.core.metrics import GEMINI_FLEX_FALLBACKS
from tests.backend.detectors.gemini.test_client import CONFIG, GREEN, RED, make, scene  # noqa: F401 - the factory fixture
from tests.fake_gemini import Oracle


@pytest.fixture
def oracle(fake_gemini):
    fake_gemini.responder = Oracle(colors={"Car": RED, "Tree": GREEN})
    return fake_gemini


def test_interactive_calls_never_ask_for_flex(make, oracle):
    detector = make()
    image, sha = scene(seed=1)
    detections = detector.detect(image, sha, CONFIG)
    assert sorted(detections.labels) == ["Car", "Tree"]
    assert [c.service_tier for c in oracle.calls] == [""]
    assert detections.meta["tier"] == "standard"


def test_flex_answer_is_used_and_costs_the_flex_share(make, oracle):
    detector = make(gemini_price_flex_factor=0.5)
    image, sha = scene(seed=2)
    flex = detector.detect(image, sha, CONFIG, tier="flex")
    assert [c.service_tier for c in oracle.calls] == ["flex"]
    assert flex.meta["tier"] == "flex" and sorted(flex.labels) == ["Car", "Tree"]
    standard = make().detect(*scene(seed=3), CONFIG)
    assert flex.meta["cost_usd"] == pytest.approx(standard.meta["cost_usd"] * 0.5, rel=0.05)


def test_refused_flex_calls_429_and_503_fall_back_to_standard(make, oracle):
    oracle.flex.refuse_rate = 1.0
    counter = {r: GEMINI_FLEX_FALLBACKS.labels(reason=r)._value.get() for r in ("rate_limited", "server_error")}
    detector = make()
    statuses = []
    for seed in range(6):  # the fake's seeded coin answers 429 or 503
        oracle.clear()
        image, sha = scene(seed=10 + seed)
        detections = detector.detect(image, sha, CONFIG, tier="flex")
        calls = oracle.calls
        assert [c.service_tier for c in calls] == ["flex", ""]
        assert calls[1].status == 200
        assert detections.meta["tier"] == "standard" and sorted(detections.labels) == ["Car", "Tree"]
        statuses.append(calls[0].status)
    assert set(statuses) == {429, 503}
    assert GEMINI_FLEX_FALLBACKS.labels(reason="rate_limited")._value.get() == counter["rate_limited"] + statuses.count(429)
    assert GEMINI_FLEX_FALLBACKS.labels(reason="server_error")._value.get() == counter["server_error"] + statuses.count(503)


def test_slow_flex_call_falls_back_after_its_own_timeout(make, oracle):
    oracle.flex.latency_s = 4.0
    detector = make(gemini_flex_timeout_s=1.0, gemini_task_deadline=5.0)
    image, sha = scene(seed=5)
    detections = detector.detect(image, sha, CONFIG, tier="flex")
    assert [c.service_tier for c in oracle.calls] == ["flex", ""]
    assert detections.meta["tier"] == "standard"
