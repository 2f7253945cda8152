# ruff: noqa: F811 - the factory fixture `make` of test_client.py is imported, then named as an argument
"""The Batch API path against the fake server, driven by the real google-genai client."""

from __future__ import annotations

import time

import pytest

from backend.detectors.gemini.batch import GeminiBatches
from tests.backend.detectors.gemini.test_client import CONFIG, GREEN, RED, make, scene  # noqa: F401 - the factory fixture
from tests.fake_gemini import Oracle


@pytest.fixture
def oracle(fake_gemini):
    fake_gemini.responder = Oracle(colors={"Car": RED, "Tree": GREEN})
    fake_gemini.batches.running_s = 0.3
    return fake_gemini


def _wait(batches: GeminiBatches, name: str, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        poll = batches.poll(name)
        if not poll.running:
            return poll
        time.sleep(0.1)
    raise AssertionError("the batch never finished")


def test_batch_results_by_key_with_a_per_request_failure_and_settled_spend(make, oracle):
    detector = make(gemini_price_batch_factor=0.5)
    batches = GeminiBatches(detector)
    oracle.batches.request_error = lambda md: {"code": 429, "message": "quota"} if md.get("key") == "12" else None
    requests = [batches.request(str(key), *scene(size=(400, 200), seed=key), CONFIG) for key in (11, 12, 13)]
    name, reserved = batches.submit(requests, "test")
    assert name.startswith("batches/") and reserved == pytest.approx(batches.estimate_usd(3))
    assert detector.cost.spent_today() == pytest.approx(reserved)  # charged when submitted
    body = next(r for r in oracle.requests if r.path.endswith(":batchGenerateContent")).body
    inlined = body["batch"]["inputConfig"]["requests"]["requests"]
    assert [r["metadata"] for r in inlined] == [{"key": "11"}, {"key": "12"}, {"key": "13"}]
    assert "serviceTier" not in inlined[0]["request"] and inlined[0]["request"]["systemInstruction"]
    assert not oracle.calls  # no generateContent call: everything went in the batch

    assert batches.poll(name).state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    poll = _wait(batches, name)
    assert poll.state == "JOB_STATE_SUCCEEDED"
    results = {r.key: r for r in poll.results}
    assert set(results) == {"11", "12", "13"}
    assert results["12"].answer is None and results["12"].error.reason == "rate_limited"
    detections = batches.detections(results["11"].answer, (400, 200), CONFIG)
    assert sorted(detections.labels) == ["Car", "Tree"] and detections.meta["tier"] == "batch"
    actual = sum(r.cost_usd for r in results.values())
    standard = detector.cost.cost_usd(results["11"].answer.usage, "standard")
    assert results["11"].cost_usd == pytest.approx(standard * 0.5)
    detector.cost.settle(reserved, actual)
    assert detector.cost.spent_today() == pytest.approx(actual)


def test_expired_and_cancelled_batches_end_without_results(make, oracle):
    detector = make()
    batches = GeminiBatches(detector)
    oracle.batches.running_s = 30.0
    oracle.batches.expire_after_s = 0.2
    name, _ = batches.submit([batches.request("1", *scene(size=(300, 200), seed=1), CONFIG)], "expiring")
    poll = _wait(batches, name)
    assert poll.state == "JOB_STATE_EXPIRED" and poll.results is None

    oracle.batches.expire_after_s = None
    name, _ = batches.submit([batches.request("2", *scene(size=(300, 200), seed=2), CONFIG)], "cancelled")
    batches.cancel(name)
    assert batches.poll(name).state == "JOB_STATE_CANCELLED"
    listed = {job.name for job in detector.client.batches.list()}
    assert name in listed
    detector.client.batches.delete(name=name)
    with pytest.raises(Exception) as info:
        detector.client.batches.get(name=name)
    assert getattr(info.value, "code", None) == 404
