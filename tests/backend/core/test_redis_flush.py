"""A real FLUSHALL on a private Redis: what is recovered (current version, day's spend, the training the
lost counter and queue owed) and how; the lost-lock requeue is in tests/worker/jobs/test_training_races.py."""

from __future__ import annotations

import pytest

from backend.core import keys
from backend.core import queue as wq
from backend.core.registry import ModelRegistry
from backend.detectors.gemini.cost import CostTracker, Usage
from tests.adversarial import PrivateRedis
from tests.worker_fixtures import make_settings


@pytest.fixture
def private(tmp_path):
    server = PrivateRedis(tmp_path).start()
    yield server
    server.stop()


def _checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"x" * 512)
    return path


def test_flushall_loses_nothing_that_can_be_recovered(tmp_path, private, monkeypatch):
    monkeypatch.setenv("LSB_QUEUE_PREFIX", "")
    client = private.client()
    settings = make_settings(tmp_path, None, redis_url=private.url, train_min_new_annotations=5,
                             gemini_daily_budget_usd=0.01, gemini_price_input_per_m=0.30, gemini_price_output_per_m=2.50)
    registry = ModelRegistry(settings.model_dir, client)
    for _ in range(2):
        registry.promote("4", registry.add_version("4", _checkpoint(tmp_path), {}).version)
    cost = CostTracker(settings, client, prefix=keys.gemini_spend())
    cost.record("m", Usage(20_000, 2_000, 0))  # $0.011: over the budget
    client.set(keys.train_events("4"), 0)  # as the last training left it
    for _ in range(3):
        assert not wq.record_annotation_event(client, "4", settings)["requested"]  # 3 of 5
    assert cost.budget_exhausted()

    client.flushall()

    assert registry.current_version("4") == "v0002"  # the disk pointer is the record
    assert registry.reconcile("4") == "v0002" and client.get(keys.model_current("4")) == b"v0002"
    assert CostTracker(settings, client, prefix=keys.gemini_spend()).budget_exhausted()  # not reset to $0
    event = wq.record_annotation_event(client, "4", settings)
    assert event["counter_lost"] and event["requested"] and event["training"]["status"] == "queued"
    assert client.get(keys.train_pending("4")).decode().startswith(event["training"]["job_id"])


def test_a_missing_counter_requests_a_training_only_for_a_project_with_a_model(tmp_path, redis15, project_id, monkeypatch):
    monkeypatch.setenv("LSB_QUEUE_PREFIX", f"t{project_id}-")
    settings = make_settings(tmp_path, None, train_min_new_annotations=3)
    first = wq.record_annotation_event(redis15, project_id, settings)  # a new project: counting starts
    assert not first["requested"] and not first["counter_lost"]
    registry = ModelRegistry(settings.model_dir, redis15)
    registry.promote(project_id, registry.add_version(project_id, _checkpoint(tmp_path), {}).version)
    redis15.delete(keys.train_events(project_id))  # the counter of a trained project vanished
    lost = wq.record_annotation_event(redis15, project_id, settings)
    assert lost["counter_lost"] and lost["requested"] and lost["training"]["status"] == "queued"
    assert not wq.record_annotation_event(redis15, project_id, settings)["counter_lost"]  # counting resumes
    for key in redis15.scan_iter(f"rq:*t{project_id}-*"):
        redis15.delete(key)
