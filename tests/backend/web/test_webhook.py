"""backend.web.webhook on real Redis and rq: every payload shape Label Studio sends, duplicate deliveries,
ANNOTATIONS_DELETED (forced retraining, status flag) and PROJECT_DELETED (mark, stop, scheduled cleanup)."""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from backend.core import import_status, keys, lifecycle, prelabel_queue
from backend.core import queue as wq
from backend.web.webhook import BadEvent, handle_event
from tests.paths import RECORDED_REQUESTS
from tests.worker_fixtures import make_settings

RECORDED = [r["body"] for r in json.loads(RECORDED_REQUESTS.read_text())["requests"] if r["path"] == "/webhook"]


def recorded(action: str, project: int) -> dict:
    """A webhook body Label Studio 1.23.2 sent, moved to ``project``."""
    body = copy.deepcopy(next(b for b in RECORDED if b["action"] == action))
    body["project"]["id"] = project
    for nested in [body.get("annotation"), *(body.get("tasks") or [])]:
        if isinstance(nested, dict) and "project" in nested:
            nested["project"] = project
    return body


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, None, train_min_new_annotations=10)


def _queued(redis15, prefix: str, kind: str) -> list[Job]:
    return Queue(f"{prefix}{kind}", connection=redis15).get_jobs()


# --- shapes ----------------------------------------------------------------------------------------

def _shapes(project_id: int) -> dict[str, dict]:
    created = recorded("ANNOTATION_CREATED", project_id)
    no_annotation = {k: v for k, v in created.items() if k != "annotation"}
    only_nested = {k: v for k, v in created.items() if k != "project"}  # project only in annotation.project
    return {
        "recorded ANNOTATION_CREATED": created,
        "recorded ANNOTATION_UPDATED": recorded("ANNOTATION_UPDATED", project_id),
        "project as int": {**created, "project": project_id},
        "project as string": {**created, "project": str(project_id)},
        "project as id.created_ts": {**created, "project": f"{project_id}.1795306664"},
        "no annotation key": no_annotation,
        "annotation null, no task": {"action": "ANNOTATION_UPDATED", "annotation": None, "project": project_id},
        "project only in annotation": only_nested,
        "project only in task": {"action": "ANNOTATION_CREATED", "task": {"id": 3, "project": project_id}},
        "bulk ANNOTATIONS_CREATED": {"action": "ANNOTATIONS_CREATED", "annotations": [{"id": 7}], "project": {"id": project_id}},
    }


def test_every_annotation_event_shape_is_counted(redis15, project_id, qprefix, tmp_path):
    settings = make_settings(tmp_path, None, webhook_dedupe_ttl=0)  # several shapes carry the same annotation
    for name, body in _shapes(project_id).items():
        before = int(redis15.get(keys.train_events(project_id)) or 0)
        result = handle_event(body, redis15, settings)
        assert result.status == 200 and result.body["status"] == "ok", name
        assert result.body["project"] == str(project_id), name
        assert int(redis15.get(keys.train_events(project_id))) == before + 1, name


def test_other_recorded_actions_and_their_short_shapes(redis15, project_id, qprefix, settings):
    deleted = recorded("ANNOTATIONS_DELETED", project_id)
    assert handle_event(deleted, redis15, settings).body["training"]["status"] == "queued"
    ids_only = {"action": "ANNOTATIONS_DELETED", "annotations": [11, 12], "project": project_id}
    assert handle_event(ids_only, redis15, settings).body["deleted"] == 2
    assert handle_event({"action": "START_TRAINING", "project": project_id}, redis15, settings).status == 201
    assert handle_event(recorded("START_TRAINING", project_id), redis15, settings).status == 201

    tasks_created = recorded("TASKS_CREATED", project_id)
    out = handle_event(tasks_created, redis15, settings)
    assert out.body["prelabel"]["status"] == "queued" and out.body["tasks"] == 1
    no_tasks = handle_event({"action": "TASKS_CREATED", "project": {"id": project_id}}, redis15, settings)
    assert no_tasks.body["tasks"] == "all" and no_tasks.body["prelabel"]["status"] == "queued"
    jobs = _queued(redis15, qprefix, "prelabel")
    assert [j.args[1] for j in jobs] == [[{"id": 5, "data": {"image": "https://example.com/b.jpg"}}], None]

    assert handle_event(recorded("PROJECT_UPDATED", project_id), redis15, settings).body["status"] == "ignored"


@pytest.mark.parametrize("body", [
    [], "x", {"no": "action"}, {"action": ""},
    {"action": "START_TRAINING"},  # "Send payload" off: no project anywhere
    {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}},
    {"action": "ANNOTATION_CREATED", "annotation": "x", "project": 2},
    {"action": "TASKS_CREATED", "project": 2, "tasks": "x"},
    {"action": "START_TRAINING", "project": {"id": "-1"}},
    {"action": "START_TRAINING", "project": True},
])
def test_malformed_events_are_refused(redis15, settings, body):
    with pytest.raises(BadEvent):
        handle_event(body, redis15, settings)


# --- duplicate deliveries --------------------------------------------------------------------------

def test_a_duplicate_delivery_does_no_work(redis15, project_id, qprefix, tmp_path):
    settings = make_settings(tmp_path, None, train_min_new_annotations=1)
    created = recorded("ANNOTATION_CREATED", project_id)
    first = handle_event(created, redis15, settings)
    again = handle_event(copy.deepcopy(created), redis15, settings)
    assert first.body["status"] == "ok" and first.body["training"]["status"] == "queued"
    assert again.body == {"status": "duplicate", "project": str(project_id)}
    assert int(redis15.get(keys.train_events(project_id))) == 1
    # the same annotation saved again is a new event (its updated_at changed)
    updated = recorded("ANNOTATION_UPDATED", project_id)
    assert handle_event(updated, redis15, settings).body["status"] == "ok"
    assert int(redis15.get(keys.train_events(project_id))) == 2

    tasks_created = recorded("TASKS_CREATED", project_id)
    assert handle_event(tasks_created, redis15, settings).body["status"] == "ok"
    assert handle_event(tasks_created, redis15, settings).body["status"] == "duplicate"
    assert len(_queued(redis15, qprefix, "prelabel")) == 1

    deleted = recorded("ANNOTATIONS_DELETED", project_id)
    assert handle_event(deleted, redis15, settings).body["status"] == "ok"
    assert handle_event(deleted, redis15, settings).body["status"] == "duplicate"
    assert int(redis15.get(keys.train_events(project_id))) == 3


def test_a_new_tasks_created_for_queued_tasks_adds_no_job(redis15, project_id, qprefix, settings):
    """Not a duplicate delivery (the body differs) but the same tasks: coalesced into the queued job."""
    first = recorded("TASKS_CREATED", project_id)
    second = copy.deepcopy(first)
    second["project"]["task_number"] += 1
    second["tasks"].append({"id": 6, "data": {"image": "https://example.com/c.jpg"}})
    a, b = handle_event(first, redis15, settings).body, handle_event(second, redis15, settings).body
    assert a["prelabel"]["tasks"] == 1 and b["prelabel"]["tasks"] == 1 and b["prelabel"]["coalesced"] == 1
    jobs = _queued(redis15, qprefix, "prelabel")
    assert [[t["id"] for t in j.args[1]] for j in jobs] == [[5], [6]]


def test_start_training_is_never_deduped_but_coalesced(redis15, project_id, qprefix, settings):
    body = {"action": "START_TRAINING", "project": project_id}
    first, second = handle_event(body, redis15, settings).body, handle_event(body, redis15, settings).body
    assert first["status"] == "queued" and second["status"] == "coalesced" and second["job_id"] == first["job_id"]
    assert len(_queued(redis15, qprefix, "training")) == 1


def test_dedupe_can_be_turned_off(redis15, project_id, qprefix, tmp_path):
    settings = make_settings(tmp_path, None, webhook_dedupe_ttl=0)
    created = recorded("ANNOTATION_CREATED", project_id)
    for _ in range(2):
        assert handle_event(created, redis15, settings).body["status"] == "ok"
    assert int(redis15.get(keys.train_events(project_id))) == 2


def test_a_failed_event_is_not_remembered_as_seen(redis15, project_id, qprefix, settings, monkeypatch):
    created = recorded("ANNOTATION_CREATED", project_id)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wq, "record_annotation_event", broken)
    with pytest.raises(RuntimeError):
        handle_event(created, redis15, settings)
    monkeypatch.undo()
    assert handle_event(created, redis15, settings).body["status"] == "ok"


# --- ANNOTATIONS_DELETED -----------------------------------------------------------------------------

def test_annotations_deleted_forces_a_retraining_and_flags_the_status(redis15, project_id, qprefix, settings):
    assert wq.training_status(redis15, project_id)["labels_deleted_since_training"] is False
    out = handle_event(recorded("ANNOTATIONS_DELETED", project_id), redis15, settings).body
    assert out["requested"] and out["training"]["status"] == "queued"  # below TRAIN_MIN_NEW_ANNOTATIONS=10
    job = Job.fetch(out["training"]["job_id"], connection=redis15)
    assert job.args == (str(project_id), None, True)  # forced
    assert wq.training_status(redis15, project_id)["labels_deleted_since_training"] is True

    deleted_at = float(redis15.get(keys.labels_deleted(project_id)))
    for last, flagged in [
        ({"status": "promoted", "started_at": deleted_at - 5}, True),  # started before the deletion
        ({"status": "skipped", "started_at": deleted_at + 5}, True),  # never reached the gate
        ({"status": "failed", "finished_at": deleted_at + 5}, True),
        ({"status": "rejected", "started_at": deleted_at + 5}, False),  # the gate kept the served model on current labels
        ({"status": "promoted", "started_at": deleted_at + 5}, False),
    ]:
        redis15.set(keys.train_last(project_id), json.dumps(last))
        assert wq.training_status(redis15, project_id)["labels_deleted_since_training"] is flagged, last


# --- PROJECT_DELETED -----------------------------------------------------------------------------------

def test_project_deleted_stops_work_and_schedules_the_cleanup(redis15, project_id, qprefix, settings):
    training = wq.request_training(redis15, project_id, settings=settings)
    prelabel = prelabel_queue.request_prelabel(redis15, project_id, tasks=[{"id": 1, "data": {}}])
    out = handle_event({"action": "PROJECT_DELETED", "project": {"id": project_id}}, redis15, settings).body
    assert out["status"] == "deleted" and out["cleanup_in_hours"] == 24.0
    assert out["stopped"] == {training["job_id"]: "canceled", prelabel["job_id"]: "canceled"}
    assert Job.fetch(training["job_id"], connection=redis15).get_status() == JobStatus.CANCELED
    assert not redis15.exists(keys.train_pending(project_id), keys.prelabel_queued(project_id))

    scheduled = ScheduledJobRegistry(f"{qprefix}training", connection=redis15)
    assert scheduled.get_job_ids() == [out["cleanup_job"]]
    when = scheduled.get_scheduled_time(out["cleanup_job"])
    assert abs((when - datetime.now(UTC)) - timedelta(hours=24)) < timedelta(minutes=1)
    cleanup = Job.fetch(out["cleanup_job"], connection=redis15)
    assert cleanup.func_name == lifecycle.CLEANUP_FUNC and cleanup.args[0] == str(project_id)

    # the project's further events and trainings are refused; a repeated deletion changes nothing
    created = recorded("ANNOTATION_CREATED", project_id)
    created["project"]["created_at"] = "2020-01-01T00:00:00Z"
    assert handle_event(created, redis15, settings).body["reason"] == "project deleted"
    refused = handle_event({"action": "START_TRAINING", "project": project_id}, redis15, settings)
    assert refused.body["reason"] == "project deleted"
    assert wq.request_training(redis15, project_id, settings=settings)["status"] == "refused"
    assert prelabel_queue.request_prelabel(redis15, project_id, tasks=[{"id": 2, "data": {}}])["status"] == "refused"
    again = handle_event({"action": "PROJECT_DELETED", "project": project_id}, redis15, settings).body
    assert again["status"] == "already_deleted" and again["cleanup_job"] == out["cleanup_job"]
    assert wq.training_status(redis15, project_id)["project_deleted_at"] == pytest.approx(out["deleted_at"], abs=0.01)


def test_a_project_created_again_under_that_id_cancels_the_cleanup(redis15, project_id, qprefix, settings):
    out = handle_event({"action": "PROJECT_DELETED", "project": project_id}, redis15, settings).body
    created = recorded("ANNOTATION_CREATED", project_id)
    created["project"]["created_at"] = (datetime.now(UTC) + timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    result = handle_event(created, redis15, settings).body
    assert result["status"] == "ok" and int(redis15.get(keys.train_events(project_id))) == 1
    assert lifecycle.deletion(redis15, project_id) is None
    assert Job.fetch(out["cleanup_job"], connection=redis15).get_status() == JobStatus.CANCELED
    assert wq.request_training(redis15, project_id, settings=settings)["status"] == "queued"


def test_grace_zero_enqueues_the_cleanup_at_once(redis15, project_id, qprefix, tmp_path):
    settings = make_settings(tmp_path, None, project_delete_grace_hours=0)
    out = handle_event({"action": "PROJECT_DELETED", "project": project_id}, redis15, settings).body
    assert [j.id for j in _queued(redis15, qprefix, "training")] == [out["cleanup_job"]]
    assert time.time() - out["deleted_at"] < 60


# --- PRELABEL_ON_IMPORT --------------------------------------------------------------------------------

def _import(project_id: int, n: int, view: str = "<View>", first: int = 100) -> dict:
    body = recorded("TASKS_CREATED", project_id)
    body["project"]["label_config"] = body["project"]["label_config"].replace("<View>", view, 1)
    body["tasks"] = [{"id": first + i, "data": {"image": f"https://example.com/{i}.jpg"}} for i in range(n)]
    return body


def test_tasks_created_drafts_what_the_policy_says(redis15, project_id, qprefix, tmp_path):
    sample = make_settings(tmp_path, None, prelabel_on_import="sample:4")
    out = handle_event(_import(project_id, 20), redis15, sample).body
    (job,) = _queued(redis15, qprefix, "prelabel")
    assert out["prelabel_job"] == job.id and len(job.args[1]) == 4
    assert out["policy"] == {"policy": "sample:4", "source": "deployment", "skipped_by_policy": 16}

    # the project's label config wins: none, whatever the deployment says
    quiet = handle_event(_import(project_id, 3, '<View prelabel_on_import="none">', first=500), redis15,
                         make_settings(tmp_path, None)).body
    assert quiet["prelabel_job"] is None and quiet["policy"]["source"] == "project"
    assert len(_queued(redis15, qprefix, "prelabel")) == 1
    status = import_status.read(redis15, project_id)
    assert (status["imported"], status["queued"], status["skipped_policy"]) == (23, 4, 19)
