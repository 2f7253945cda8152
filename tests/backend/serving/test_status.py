"""backend.serving.status: the status page's data, read from the registry and Redis (never computed on a load)."""

from __future__ import annotations

import json
import signal

import pytest
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry

from backend.core import keys
from backend.core import queue as training_queue
from backend.core.registry import ModelRegistry
from backend.serving.status import collect, project_status
from tests.worker_fixtures import make_settings
from worker.jobs.training import HISTORY_LENGTH, _store_last


def _registry_with_two_versions(tmp_path, redis15, project):
    registry = ModelRegistry(tmp_path / "models", redis15)
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(b"not loaded by the status page")
    for map50, promote in ((0.41, True), (0.62, True)):
        info = registry.add_version(project, checkpoint, {
            "metrics": {"map50": map50, "map50_95": map50 / 2}, "gate": {"promote": promote, "reason": f"gain {map50}"},
            "dataset": {"counts": {"human_tasks": 7, "draft_tasks": 3}},
            "draft_quality": {"gemini": {"map50": 0.5, "n": 4}}})
        registry.promote(project, info.version)
    return registry


def test_versions_history_quality_routing_and_links(tmp_path, redis15, project_id):
    settings = make_settings(tmp_path, None, label_studio_url="http://ls.example:8080", routing="auto")
    registry = _registry_with_two_versions(tmp_path, redis15, project_id)
    _store_last(redis15, str(project_id), {"status": "rejected", "reason": "no gain", "candidate_metrics": {"map50": 0.3}})
    _store_last(redis15, str(project_id), {"status": "failed", "error": "LabelStudioUnavailable: down"})
    redis15.set(keys.quality(project_id), json.dumps({"sources": {"gemini": {"map50": 0.5, "precision": 0.7}}}))

    status = project_status(settings, redis15, registry, project_id)

    assert status["current_version"] == "v0002"
    assert [(v["version"], v["state"], v["map50"]) for v in status["versions"]] == [
        ("v0001", "promoted", 0.41), ("v0002", "current", 0.62)]
    assert status["versions"][0]["counts"] == {"human_tasks": 7, "draft_tasks": 3}
    assert [(t["status"], t["reason"]) for t in status["trainings"]] == [
        ("failed", "LabelStudioUnavailable: down"), ("rejected", "no gain")]
    assert status["quality"]["sources"]["gemini"]["precision"] == 0.7
    assert status["evaluation"] is None  # rendered as "not measured yet"
    assert status["routing"]["first"] == "yolo" and "0.620 >= " in status["routing"]["why"]
    assert status["links"] == {"project": f"http://ls.example:8080/projects/{project_id}/data",
                               "task": f"http://ls.example:8080/projects/{project_id}/data?task="}
    assert status["live"]["running"] is None and status["errors"] == {}


def test_history_is_capped(tmp_path, redis15, project_id):
    for i in range(HISTORY_LENGTH + 5):
        _store_last(redis15, str(project_id), {"status": "skipped", "reason": str(i)})
    assert redis15.llen(keys.train_history(project_id)) == HISTORY_LENGTH
    assert json.loads(redis15.get(keys.train_last(project_id)))["reason"] == str(HISTORY_LENGTH + 4)


def test_collect_lists_every_project_on_disk_with_money(tmp_path, redis15, project_id):
    settings = make_settings(tmp_path, None)
    registry = _registry_with_two_versions(tmp_path, redis15, project_id)
    page = collect(settings, redis15, registry)
    assert [p["project"] for p in page["projects"]] == [str(project_id)]
    assert set(page["money"]) >= {"today_usd", "total_usd", "yolo_savings_usd", "tokens", "cache"}
    assert "predictions" in page["totals"]


def test_money_per_project_from_its_own_tally(tmp_path, redis15, project_id):
    """Spend per tier, share per source, cost per 1,000 drafts and YOLO's savings from ``lsb:gemini:money:<p>``."""
    settings = make_settings(tmp_path, None)
    registry = ModelRegistry(tmp_path / "models", redis15)
    # what CostTracker.count_task writes for this project: 2 standard drafts, 1 batch, 1 cache hit, 4 YOLO drafts
    redis15.hset(keys.gemini_project_money(project_id), mapping={
        "usd:standard": 0.004, "usd:batch": 0.001, "tasks:gemini:standard": 2, "tasks:gemini:batch": 1,
        "tasks:gemini:cache": 1, "tasks:yolo": 4})
    money = project_status(settings, redis15, registry, project_id, totals={}, service_per_task=0.5)["money"]
    assert money["spend_by_tier_usd"] == pytest.approx({"standard": 0.004, "batch": 0.001})
    assert money["total_usd"] == pytest.approx(0.005) and money["drafted_tasks"] == 8
    assert money["tasks_by_source"] == {"gemini:standard": 2, "gemini:batch": 1, "gemini:cache": 1, "yolo": 4}
    assert money["share_by_source"] == {"gemini": 0.5, "yolo": 0.5}
    assert money["cost_per_1000_tasks_usd"] == pytest.approx(1000 * 0.005 / 8)
    assert money["gemini_cost_per_task_usd"] == pytest.approx(0.005 / 3)  # its own measure, not the service's 0.5
    assert money["yolo_savings_usd"] == pytest.approx(4 * 0.005 / 3) and money["cost_per_task_measured"]

    other = project_id + 1  # only YOLO drafts: saved at the service-wide cost per task, and it says so
    try:
        redis15.hset(keys.gemini_project_money(other), "tasks:yolo", 10)
        yolo_only = project_status(settings, redis15, registry, other, totals={}, service_per_task=0.002)["money"]
        assert yolo_only["yolo_savings_usd"] == pytest.approx(0.02) and not yolo_only["cost_per_task_measured"]
        assert yolo_only["share_by_source"] == {"yolo": 1.0} and yolo_only["cost_per_1000_tasks_usd"] == 0.0
    finally:
        redis15.delete(keys.gemini_project_money(other))
    fresh = project_status(settings, redis15, registry, project_id + 2, totals={})["money"]
    assert fresh["drafted_tasks"] == 0 and fresh["cost_per_1000_tasks_usd"] is None and fresh["yolo_savings_usd"] is None


def fail_on_purpose(message: str) -> None:
    """An RQ job that fails the way a real one does: an exception inside the worker."""
    raise RuntimeError(message)


def test_a_failed_rq_job_of_the_project_shows_with_its_message(tmp_path, redis15, project_id, qprefix):
    settings = make_settings(tmp_path, None)
    registry = ModelRegistry(tmp_path / "models", redis15)
    queue = Queue(training_queue.queue_name(training_queue.TRAINING_QUEUE), connection=redis15)
    mine = queue.enqueue(fail_on_purpose, f"label studio said no to {project_id}", meta={"project": str(project_id)})
    theirs = queue.enqueue(fail_on_purpose, "another project's trouble", meta={"project": str(project_id + 1)})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        SimpleWorker([queue], connection=redis15).work(burst=True, logging_level="WARNING")
    finally:
        for sig, handler in handlers.items():  # rq's worker installs its own
            signal.signal(sig, handler)
    assert set(FailedJobRegistry(queue=queue).get_job_ids()) == {mine.id, theirs.id}  # both really failed

    jobs = project_status(settings, redis15, registry, project_id, totals={})["failures"]["jobs"]

    assert [(j["job_id"], j["queue"]) for j in jobs] == [(mine.id, "training")]
    assert jobs[0]["message"] == f"RuntimeError: label studio said no to {project_id}"
    assert jobs[0]["ended_at"] is not None
