"""Pre-labeling job: drafts imported tasks and stores them in Label Studio, idempotently."""

from __future__ import annotations

import threading

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.core.label_studio import LabelStudioUnavailable
from backend.core.settings import get_settings
from tests import fake_gemini as fg
from tests.fake_label_studio import FakeLabelStudio
from tests.synthetic import label_config, make_images
from worker.jobs import prelabeling
from worker.jobs.prelabeling import prelabel_tasks

CLASSES = ("Car", "Person")


@pytest.fixture
def project(monkeypatch, tmp_path, redis_url):
    images = make_images(4, seed=3, max_objects=2)
    oracle = fg.Oracle()
    for im in images:
        oracle.add(im.image, [(b.xyxy, b.label) for b in im.boxes])
    with FakeLabelStudio() as ls, fg.FakeGemini(responder=oracle) as gemini:
        pid = ls.add_project(label_config(CLASSES))
        ids = [ls.add_task(pid, im.encode()) for im in images]
        for name, value in (("LABEL_STUDIO_URL", ls.url), ("LABEL_STUDIO_API_KEY", ls.pat), ("GEMINI_API_KEY", fg.DEFAULT_KEY),
                            ("GEMINI_BASE_URL", gemini.base_url), ("REDIS_URL", redis_url), ("MODEL_DIR", str(tmp_path / "m")),
                            ("DATA_DIR", str(tmp_path / "d")), ("GEMINI_TASK_DEADLINE", "3"), ("GEMINI_BREAKER_FAILURES", "1000"),
                            ("GEMINI_CACHE_TTL", "1")):
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        yield ls, gemini, pid, ids, images
        get_settings.cache_clear()


def test_webhook_tasks_are_drafted_stored_once_and_failures_left_for_a_retry(project):
    ls, gemini, pid, ids, _ = project
    gemini.script(fg.blocked())  # the first task's Gemini call is blocked and there is no YOLO model
    tasks = [{"id": tid, "data": ls.tasks[tid]["data"]} for tid in ids]
    result = prelabel_tasks(str(pid), tasks, ls.projects[pid]["label_config"])
    assert result["tasks"] == 4 and result["stored"] == 3 and result["failed"] == 1
    assert any("blocked" in reason for reason in result["failure_reasons"])
    stored = {tid: ls.tasks[tid]["predictions"] for tid in ids}
    assert sorted(len(p) for p in stored.values()) == [0, 1, 1, 1]
    interface = LabelInterface(ls.projects[pid]["label_config"])
    for predictions in stored.values():
        for prediction in predictions:
            assert prediction["model_version"] == "gemini:gemini-2.5-flash"
            assert interface.validate_prediction({k: prediction[k] for k in ("result", "score", "model_version")},
                                                 return_errors=True) == []

    # Running again (a retry, or "pre-label everything"): only the failed task is drafted now.
    again = prelabel_tasks(str(pid), None, None)
    assert again["stored"] == 1 and again["skipped"] == 3 and again["failed"] == 0
    assert all(len(ls.tasks[tid]["predictions"]) == 1 for tid in ids)


def test_label_studio_down_is_a_clear_retryable_error(project):
    ls, _, pid, _, _ = project
    ls.stop()
    with pytest.raises(LabelStudioUnavailable, match="unreachable"):
        prelabel_tasks(str(pid), None, None)


def test_the_job_starts_no_hot_swap_watcher_thread(project):
    """The job drafts with its own predictor; the web's watcher threads would outlive it in the worker."""
    pid = project[2]
    watchers = {"model-hotswap", "model-pubsub"}  # the names ModelHolder gives its threads
    before = {t for t in threading.enumerate() if t.name in watchers}
    result = prelabel_tasks(str(pid), None, None)
    assert result["stored"] == 4
    assert {t for t in threading.enumerate() if t.name in watchers} == before


def test_only_tasks_of_the_project_get_a_draft(project, monkeypatch):
    """Before: the job stored a draft on every task id it was given, in whatever project the token could reach."""
    monkeypatch.setattr(prelabeling, "RELIST_DELAYS", (0.01, 0.01))
    listings = []
    real_listing = prelabeling.project_task_ids
    monkeypatch.setattr(prelabeling, "project_task_ids", lambda ls, pid: listings.append(pid) or real_listing(ls, pid))
    ls, _, pid, ids, images = project
    other = ls.add_project(label_config(CLASSES))
    foreign = ls.add_task(other, images[0].encode())
    tasks = [{"id": ids[0], "data": ls.tasks[ids[0]]["data"]},
             {"id": foreign, "data": ls.tasks[foreign]["data"]},   # another project's task
             {"id": 10**9, "data": ls.tasks[ids[1]]["data"]},      # no such task
             {"id": "not-an-id", "data": {}}, {"data": {}}]        # malformed ids
    result = prelabel_tasks(str(pid), tasks, ls.projects[pid]["label_config"])
    assert result["stored"] == 1 and result["tasks"] == 1 and result["not_in_project"] == 4
    assert len(ls.tasks[ids[0]]["predictions"]) == 1
    assert ls.tasks[foreign]["predictions"] == []
    assert listings == [pid, pid, pid], "missing ids are looked for again after each delay"


def test_a_task_label_studio_has_not_committed_yet_is_found_on_a_later_listing(project, monkeypatch):
    """TASKS_CREATED can arrive before Label Studio's import commits: the job lists the project again."""
    monkeypatch.setattr(prelabeling, "RELIST_DELAYS", (0.01, 0.01))
    ls, _, pid, ids, _ = project
    ls.tasks[ids[0]]["project"] = -1  # not visible in the project's list yet
    real_listing = prelabeling.project_task_ids

    def listing(client, project_id):
        found = real_listing(client, project_id)
        ls.tasks[ids[0]]["project"] = pid  # "committed" right after the first listing
        return found

    monkeypatch.setattr(prelabeling, "project_task_ids", listing)
    result = prelabel_tasks(str(pid), [{"id": ids[0], "data": ls.tasks[ids[0]]["data"]}], ls.projects[pid]["label_config"])
    assert result["stored"] == 1 and result["not_in_project"] == 0
