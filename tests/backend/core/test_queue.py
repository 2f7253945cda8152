"""backend.core.queue: coalescing and status, then real ``rq worker`` subprocesses (with the worker's lock)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from backend.core import keys
from backend.core import queue as wq
from backend.core.connection import connect
from backend.core.registry import ModelRegistry
from tests.live import wait_for
from tests.paths import TEST_REDIS_URL
from tests.worker_fixtures import ROOT, RQWorker, good_model, job_status, make_settings, populate, settings_env


@pytest.fixture
def settings(tmp_path, fake_ls):
    return make_settings(tmp_path, fake_ls)


def _runs(redis15, project) -> list[dict]:
    return [json.loads(x) for x in redis15.lrange(f"test:runs:{project}", 0, -1)]


# --- no worker -----------------------------------------------------------------------------------

def test_light_import():
    code = "import sys, backend.core.queue; bad = [m for m in ('torch', 'ultralytics', 'cv2') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_request_coalesces_and_upgrades_force(redis15, project_id, qprefix, settings):
    client = connect(TEST_REDIS_URL, timeout=1.0)  # the web route's client
    started = time.perf_counter()
    first = wq.request_training(client, project_id, settings=settings)
    elapsed = time.perf_counter() - started
    assert first["status"] == "queued" and first["queue"] == f"{qprefix}training"
    assert elapsed < 0.5
    second = wq.request_training(client, project_id, label_config="<View/>", settings=settings)
    assert second == {**first, "status": "coalesced"}
    assert redis15.get(keys.train_force(project_id)) is None
    wq.request_training(client, project_id, force=True, settings=settings)
    assert redis15.get(keys.train_force(project_id)) == b"1"
    q = Queue(f"{qprefix}training", connection=redis15)
    assert q.job_ids == [first["job_id"]]
    job = Job.fetch(first["job_id"], connection=redis15)
    assert job.func_name == "worker.jobs.training.train_project" and job.args == (str(project_id), None, False)
    assert job.timeout == settings.train_job_timeout and job.retries_left == len(wq.retry_intervals())


@pytest.mark.parametrize("state", ["missing", "failed", "stopped", "finished", "dead_worker"])
def test_stale_pending_marker_is_ignored(redis15, project_id, qprefix, settings, state):
    old_id = f"train-{project_id}-old"
    redis15.set(keys.train_pending(project_id), f"{old_id} {time.time() - 3600:.3f}")
    old = None
    if state != "missing":  # a real job in that state, written through rq's API
        old = Job.create("os.getpid", id=old_id, connection=redis15)
        old.set_status(JobStatus.STARTED if state == "dead_worker" else JobStatus(state), pipeline=None)
        old.last_heartbeat = datetime(2000, 1, 1, tzinfo=UTC)
        old.save()
    try:
        out = wq.request_training(redis15, project_id, settings=settings)
        assert out["status"] == "queued" and out["job_id"] != old_id
        assert redis15.get(keys.train_pending(project_id)).decode().startswith(out["job_id"] + " ")
    finally:
        if old is not None:
            old.delete()


@pytest.mark.parametrize("state", ["queued", "scheduled", "started"])
def test_live_pending_job_is_coalesced_into(redis15, project_id, qprefix, settings, state):
    old_id = f"train-{project_id}-live"
    redis15.set(keys.train_pending(project_id), f"{old_id} {time.time() - 3600:.3f}")
    old = Job.create("os.getpid", id=old_id, connection=redis15)
    old.set_status(JobStatus(state), pipeline=None)
    old.last_heartbeat = datetime.now(UTC)  # a worker is alive on it
    old.save()
    try:
        assert wq.request_training(redis15, project_id, settings=settings) == {
            "status": "coalesced", "job_id": old_id, "project": str(project_id), "queue": f"{qprefix}training"}
    finally:
        old.delete()


def test_young_marker_of_a_job_being_enqueued_is_live(redis15, project_id, qprefix, settings):
    redis15.set(keys.train_pending(project_id), f"train-{project_id}-x {time.time():.3f}")
    assert wq.request_training(redis15, project_id, settings=settings)["status"] == "coalesced"


def test_record_annotation_event_threshold(redis15, project_id, qprefix, tmp_path):
    s = make_settings(tmp_path, None, train_min_new_annotations=3)
    outs = [wq.record_annotation_event(redis15, project_id, s) for _ in range(4)]
    assert [o["requested"] for o in outs] == [False, False, True, True]
    assert outs[2]["training"]["status"] == "queued" and outs[3]["training"]["status"] == "coalesced"
    assert outs[3]["events"] == 4


def test_training_status(redis15, project_id, qprefix, settings):
    assert wq.training_status(redis15, project_id)["queued"] is None
    assert wq.training_status(redis15, project_id)["base_model"] is None  # no training yet
    queued = wq.request_training(redis15, project_id, settings=settings)
    base = {"requested": "yolo11n.pt", "used": "yolo11n.yaml", "pretrained": False, "reason": "offline",
            "detail": "download failed", "fallback": True}
    redis15.set(keys.train_last(project_id), json.dumps({"status": "promoted", "version": "v0003", "base_model": base}))
    redis15.set(keys.model_current(project_id), "v0003")
    job = Job.fetch(queued["job_id"], connection=redis15)
    job.meta["progress"] = {"stage": "training", "epoch": 2}
    job.save_meta()
    redis15.set(keys.train_running(project_id), json.dumps({"job_id": queued["job_id"], "token": "t", "host": "h", "pid": 1,
                                                            "since": time.time()}), px=5000)  # as the worker's lock holds it
    status = wq.training_status(redis15, project_id)
    assert status["queued"] == {"job_id": queued["job_id"], "status": "queued"}
    assert status["running"]["job_id"] == queued["job_id"] and status["progress"] == {"stage": "training", "epoch": 2}
    assert status["last"]["version"] == "v0003" and status["current_version"] == "v0003"
    assert status["base_model"] == base  # what the last training started from, said plainly
    redis15.delete(keys.train_running(project_id))


# --- real rq workers -----------------------------------------------------------------------------

def _worker(tmp_path, qprefix, settings, name="w", **env) -> RQWorker:
    full = {**settings_env(settings), "LSB_QUEUE_PREFIX": qprefix, "LSB_TRAIN_LOCK_TTL": "3", **env}
    return RQWorker([f"{qprefix}training"], {k: str(v) for k, v in full.items()}, tmp_path / f"{name}.log")


def test_coalescing_100_events_with_a_worker(redis15, project_id, qprefix, tmp_path, monkeypatch):
    monkeypatch.setattr(wq, "TRAIN_FUNC", "tests.worker_fixtures.stub_train")
    s = make_settings(tmp_path, None, train_min_new_annotations=1)
    worker = _worker(tmp_path, qprefix, s, STUB_SECONDS="2.5")
    try:
        time.sleep(1.0)  # let the worker start: events then arrive while a job runs
        statuses = []
        for _ in range(100):
            statuses.append(wq.record_annotation_event(redis15, project_id, s)["training"]["status"])
            time.sleep(0.01)
        wait_for(lambda: not redis15.exists(keys.train_pending(project_id), keys.train_running(project_id)),
                 60, message="the trainings to finish")
        time.sleep(0.5)
        runs = _runs(redis15, project_id)
    finally:
        worker.stop()
    assert 1 <= len(runs) <= 2, runs
    assert statuses.count("queued") == len(runs) and statuses.count("coalesced") == 100 - len(runs)
    assert sum(r["events"] for r in runs) == 100  # every event was consumed by some training
    if len(runs) == 2:
        assert runs[1]["start"] >= runs[0]["end"]


def test_two_workers_never_train_one_project_at_once(redis15, project_id, qprefix, tmp_path, monkeypatch):
    monkeypatch.setattr(wq, "TRAIN_FUNC", "tests.worker_fixtures.stub_train")
    s = make_settings(tmp_path, None)
    workers = [_worker(tmp_path, qprefix, s, name=f"w{i}", STUB_SECONDS="2") for i in range(2)]
    try:
        first = wq.request_training(redis15, project_id, settings=s)
        wait_for(lambda: redis15.exists(keys.train_running(project_id)), 30, message="the first run to start")
        follow_up = wq.request_training(redis15, project_id, force=True, settings=s)  # during the run
        assert follow_up["status"] == "queued" and follow_up["job_id"] != first["job_id"]
        # the second worker takes the follow-up at once but must wait for the lock
        wait_for(lambda: job_status(redis15, follow_up["job_id"]) == "started", 30, message="the follow-up to start")
        assert wq.request_training(redis15, project_id, settings=s)["status"] == "coalesced"  # still one pending
        wait_for(lambda: len(_runs(redis15, project_id)) == 2, 60, message="two runs")
    finally:
        for w in workers:
            w.stop()
    a, b = _runs(redis15, project_id)
    assert b["start"] >= a["end"] and a["pid"] != b["pid"]
    assert b["force"] is True
    assert Job.fetch(follow_up["job_id"], connection=redis15).meta.get("progress", {}).get("stage") != "failed"


@pytest.mark.slow
def test_label_studio_down_is_retried_with_backoff(redis15, project_id, qprefix, tmp_path, fake_ls, monkeypatch):
    monkeypatch.setenv("LSB_TRAIN_RETRY_INTERVALS", "1,1,1")
    pid, _, _ = populate(fake_ls, n=12, project=project_id)
    s = make_settings(tmp_path, fake_ls)
    fake_ls.fail_with(503)
    worker = _worker(tmp_path, qprefix, s)
    try:
        job_id = wq.request_training(redis15, pid, force=True, settings=s)["job_id"]

        def last():
            raw = redis15.get(keys.train_last(pid))
            return json.loads(raw) if raw else None

        failed = wait_for(lambda: (result := last()) and result["status"] == "failed" and result, 60, message="a failed attempt")
        assert "503" in failed["error"] and "Label Studio" in failed["error"] and failed["retrying"]
        # while the retry is scheduled, it is still the project's pending training
        assert wq.request_training(redis15, pid, settings=s)["job_id"] == job_id
        wait_for(lambda: Job.fetch(job_id, connection=redis15).retries_left == 1, 60, message="a second failure")
        fake_ls.fail_with(None)  # Label Studio is back: the third attempt trains
        wait_for(lambda: job_status(redis15, job_id) in ("finished", "failed"), 300, message="the job to end")
        assert job_status(redis15, job_id) == "finished", worker.log()
        result = Job.fetch(job_id, connection=redis15).return_value()
    finally:
        worker.stop()
    assert result["status"] == "promoted" and result["version"] == "v0001"
    assert ModelRegistry(s.model_dir, redis15).current_version(pid) == "v0001"
    assert len([r for r in fake_ls.requests_log if r["path"] == "/api/token/refresh/"]) >= 3


@pytest.mark.slow
def test_worse_candidate_is_not_promoted_by_the_worker(redis15, project_id, qprefix, tmp_path, fake_ls):
    good = good_model()
    pid, _, _ = populate(fake_ls, n=16, project=project_id, seed=21)
    # A candidate that cannot see the shapes. One batch holds the whole training split (at most 12 of 16 tasks):
    # the split follows the random project id, and a last batch of one image at imgsz 32 is refused by Ultralytics.
    s = make_settings(tmp_path, fake_ls, train_imgsz=32, train_batch=16)
    registry = ModelRegistry(s.model_dir, redis15)
    registry.promote(pid, registry.add_version(pid, good["checkpoint"], {"classes": ["Car", "Person"]}).version)
    worker = _worker(tmp_path, qprefix, s)
    try:
        job_id = wq.request_training(redis15, pid, force=True, settings=s)["job_id"]
        wait_for(lambda: job_status(redis15, job_id) in ("finished", "failed"), 300, message="the job to end")
        assert job_status(redis15, job_id) == "finished", worker.log()
        result = Job.fetch(job_id, connection=redis15).return_value()
    finally:
        worker.stop()
    assert result["status"] == "rejected" and not result["promoted"] and result["fine_tuned"]
    assert result["candidate_metrics"]["map50_95"] < result["current_metrics"]["map50_95"]
    assert result["current_metrics"]["map50_95"] > 0.2
    assert registry.current_version(pid) == "v0001" and [v.version for v in registry.versions(pid)] == ["v0001"]
    assert registry.current(pid).meta["last_challenger"]["metrics"]["map50_95"] == result["candidate_metrics"]["map50_95"]
    status = wq.training_status(redis15, pid)
    assert status["last"]["status"] == "rejected" and status["current_version"] == "v0001"


@pytest.mark.slow
def test_sigkill_mid_training_leaves_current_untouched(redis15, project_id, qprefix, tmp_path, fake_ls):
    good = good_model()
    pid, _, _ = populate(fake_ls, n=16, project=project_id, seed=22)
    s = make_settings(tmp_path, fake_ls, train_imgsz=64, train_epochs=300)
    registry = ModelRegistry(s.model_dir, redis15)
    registry.promote(pid, registry.add_version(pid, good["checkpoint"], {"classes": ["Car", "Person"]}).version)
    root = s.model_dir / str(pid)
    before = sorted(p.name for p in root.iterdir())

    doomed = _worker(tmp_path, qprefix, s, name="doomed")
    job_id = wq.request_training(redis15, pid, force=True, settings=s)["job_id"]
    try:
        def epoch():
            progress = (Job.fetch(job_id, connection=redis15).meta or {}).get("progress") or {}
            return progress.get("stage") == "training" and progress.get("epoch", 0) >= 2 and progress

        progress = wait_for(epoch, 300, interval=0.3, message="two epochs")
        assert progress["epochs"] == 300 and "train/box_loss" in progress["losses"]
        assert wq.training_status(redis15, pid)["progress"]["epoch"] >= 2
    finally:
        doomed.kill()  # SIGKILL: worker, work horse and scheduler, mid-training
    assert sorted(p.name for p in root.iterdir()) == before == ["current.json", "v0001"]
    assert registry.current_version(pid) == "v0001" and [v.version for v in registry.versions(pid)] == ["v0001"]
    assert job_status(redis15, job_id) == "started"  # abandoned: RQ finds out later, nothing waits on it
    assert redis15.exists(keys.train_running(pid))  # the dead run's lock, expiring (LSB_TRAIN_LOCK_TTL=3)

    again = wq.request_training(redis15, pid, force=True, settings=s)
    assert again["status"] == "queued" and again["job_id"] != job_id
    survivor = _worker(tmp_path, qprefix, make_settings(tmp_path, fake_ls, train_imgsz=64, train_epochs=1), name="survivor")
    try:
        wait_for(lambda: job_status(redis15, again["job_id"]) in ("finished", "failed"), 300, message="the new training")
        assert job_status(redis15, again["job_id"]) == "finished", survivor.log()
        result = Job.fetch(again["job_id"], connection=redis15).return_value()
    finally:
        survivor.stop()
    assert result["status"] in ("promoted", "rejected") and result["parent"] == "v0001"
    assert result["durations"]["wait_lock"] >= 0.0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left behind
