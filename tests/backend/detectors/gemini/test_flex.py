# ruff: noqa: F811 - the factory fixture `make` of test_client.py is imported, then named as an argument
"""The Flex tier of bulk drafting: served at half price; a 429/503 is retried on Flex (a refused call is billed
nothing), and only when the retries or the Flex time run out, or on a timeout, does the task go to standard."""

from __future__ import annotations

import pytest

from backend.core.metrics import GEMINI_FLEX_FALLBACKS, GEMINI_FLEX_RETRIES
from tests.backend.detectors.gemini.test_client import CONFIG, GREEN, RED, make, one_box, scene  # noqa: F401 - the factory fixture
from tests.fake_gemini import Oracle, error, rate_limited, server_error


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


def test_refused_flex_calls_429_and_503_fall_back_to_standard_after_the_retries(make, oracle):
    oracle.flex.refuse_rate = 1.0
    counter = {r: GEMINI_FLEX_FALLBACKS.labels(reason=r)._value.get() for r in ("rate_limited", "server_error")}
    detector = make(gemini_flex_retries=1)
    statuses = []
    for seed in range(4):  # the fake's seeded coin answers 429 or 503
        oracle.clear()
        image, sha = scene(seed=10 + seed)
        detections = detector.detect(image, sha, CONFIG, tier="flex")
        calls = oracle.calls
        assert [c.service_tier for c in calls] == ["flex", "flex", ""]
        assert calls[2].status == 200
        assert detections.meta["tier"] == "standard" and sorted(detections.labels) == ["Car", "Tree"]
        statuses.append(calls[1].status)  # the last refusal is the fallback's reason
    assert set(statuses) <= {429, 503}
    assert GEMINI_FLEX_FALLBACKS.labels(reason="rate_limited")._value.get() == counter["rate_limited"] + statuses.count(429)
    assert GEMINI_FLEX_FALLBACKS.labels(reason="server_error")._value.get() == counter["server_error"] + statuses.count(503)


def test_flex_429_then_success_is_charged_once_at_the_flex_price(make, oracle):
    retried = GEMINI_FLEX_RETRIES.labels(reason="rate_limited")._value.get()
    oracle.script(rate_limited("1s"), one_box())
    detector = make(gemini_price_flex_factor=0.5)
    image, sha = scene(seed=20)
    detections = detector.detect(image, sha, CONFIG, tier="flex")
    first, second = oracle.calls
    assert (first.service_tier, first.status, second.service_tier, second.status) == ("flex", 429, "flex", 200)
    assert detector._sleep.waits[0] >= 1.0  # the server's RetryInfo is the least wait
    assert second.received_at - first.received_at >= 1.0
    assert detections.meta["tier"] == "flex" and detections.meta["attempts"] == 2 and detections.labels == ["Car"]
    assert GEMINI_FLEX_RETRIES.labels(reason="rate_limited")._value.get() == retried + 1
    # Charged once, at half the standard price of the same answer; the refused call cost nothing.
    oracle.script(one_box())
    standard = make().detect(image, sha + "-standard", CONFIG)
    assert standard.meta["tier"] == "standard"
    assert detector.cost.spent_today() == pytest.approx(standard.meta["cost_usd"] * 0.5)
    assert detector.cost.spent_today() == pytest.approx(detections.meta["cost_usd"])


def test_flex_retry_after_header_is_honoured(make, oracle):
    oracle.script(error(503, "UNAVAILABLE", "The model is overloaded.", headers={"Retry-After": "1.5"}), one_box())
    detector = make()
    detections = detector.detect(*scene(seed=21), CONFIG, tier="flex")
    assert [c.service_tier for c in oracle.calls] == ["flex", "flex"]
    assert detector._sleep.waits[0] >= 1.5
    assert detections.meta["tier"] == "flex"


def test_n_refusals_fall_back_to_standard_charged_once_at_the_standard_price(make, oracle):
    oracle.script(server_error(503), rate_limited(None), server_error(503), one_box())
    detector = make(gemini_flex_retries=2, gemini_price_flex_factor=0.5)
    detections = detector.detect(*scene(seed=22), CONFIG, tier="flex")
    calls = oracle.calls
    assert [(c.service_tier, c.status) for c in calls] == [("flex", 503), ("flex", 429), ("flex", 503), ("", 200)]
    assert len(detector._sleep.waits) == 2  # GEMINI_FLEX_RETRIES waits, none after the last refusal
    assert detections.meta["tier"] == "standard" and detections.meta["attempts"] == 4
    oracle.script(one_box())
    standard = make().detect(*scene(seed=23), CONFIG)
    assert detector.cost.spent_today() == pytest.approx(standard.meta["cost_usd"])  # once, at the full price


def test_a_server_wait_beyond_the_flex_time_falls_back_at_once(make, oracle):
    oracle.script(rate_limited("30s"), one_box())
    detector = make(gemini_flex_timeout_s=5.0, gemini_flex_retries=5)
    detections = detector.detect(*scene(seed=24), CONFIG, tier="flex")
    assert [c.service_tier for c in oracle.calls] == ["flex", ""]
    assert detector._sleep.waits == []
    assert detections.meta["tier"] == "standard"


def test_no_flex_retries_when_set_to_zero(make, oracle):
    oracle.script(server_error(503), one_box())
    detector = make(gemini_flex_retries=0)
    detections = detector.detect(*scene(seed=25), CONFIG, tier="flex")
    assert [c.service_tier for c in oracle.calls] == ["flex", ""]
    assert detections.meta["tier"] == "standard"


def test_slow_flex_call_falls_back_after_its_own_timeout(make, oracle):
    oracle.flex.latency_s = 4.0
    detector = make(gemini_flex_timeout_s=1.0, gemini_task_deadline=5.0)
    image, sha = scene(seed=5)
    detections = detector.detect(image, sha, CONFIG, tier="flex")
    assert [c.service_tier for c in oracle.calls] == ["flex", ""]
    assert detections.meta["tier"] == "standard"
