"""backend.serving.status: the status page's data, read from the registry and Redis (never computed on a load)."""

from __future__ import annotations

import json

from backend.core import keys
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
