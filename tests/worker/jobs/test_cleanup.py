"""worker.jobs.cleanup: a deleted project's folders and Redis keys go after the grace period, through a real
``rq worker --with-scheduler``; nothing goes when the project exists again, the deletion was cancelled, or
Label Studio cannot say."""

from __future__ import annotations

import pytest

from backend.core import keys, lifecycle
from backend.core import queue as wq
from backend.core.label_studio import LabelStudioUnavailable
from backend.web.webhook import handle_event
from tests.live import wait_for
from tests.synthetic import label_config
from tests.worker_fixtures import RQWorker, job_status, make_settings, settings_env
from worker.jobs.cleanup import run_cleanup


@pytest.fixture
def two_projects(redis15, project_id):
    """The project to delete and a neighbour that must survive (ids that share a prefix)."""
    ids = (project_id, project_id * 10)
    yield ids
    for pid in ids:
        for pattern in keys.project_patterns(pid):
            for key in redis15.scan_iter(pattern):
                redis15.delete(key)


def _populate(settings, redis15, pid: int) -> list:
    """What the service keeps for a project: a model version, datasets, a rejected candidate, Redis keys."""
    folders = [settings.model_dir / str(pid) / "v0001", settings.data_dir / "datasets" / str(pid) / "abc",
               settings.data_dir / "candidates" / str(pid)]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "file.bin").write_bytes(b"x")
    redis15.set(keys.train_events(pid), 3)
    redis15.set(keys.model_current(pid), "v0001")
    redis15.set(keys.quality(pid), "{}")
    redis15.set(keys.webhook_seen(pid, "d" * 64), "1")
    redis15.hset(keys.prelabel_queued(pid), "1", "prelabel-x 1.0")
    return [settings.model_dir / str(pid), settings.data_dir / "datasets" / str(pid), settings.data_dir / "candidates" / str(pid)]


def _project_keys(redis15, pid: int) -> list[bytes]:
    return sorted(k for pattern in keys.project_patterns(pid) for k in redis15.scan_iter(pattern))


def test_cleanup_after_the_grace_period_through_the_scheduler(redis15, two_projects, qprefix, tmp_path, fake_ls):
    pid, neighbour = two_projects
    settings = make_settings(tmp_path, fake_ls, project_delete_grace_hours=2 / 3600)  # 2 s
    doomed = _populate(settings, redis15, pid)
    kept = _populate(settings, redis15, neighbour)
    fake_ls.add_project(label_config(("Car",)), project_id=neighbour)  # pid is not in Label Studio: deleted

    out = handle_event({"action": "PROJECT_DELETED", "project": {"id": pid}}, redis15, settings).body
    assert all(p.exists() for p in doomed)  # nothing goes before the grace period
    worker = RQWorker([f"{qprefix}training"], {**settings_env(settings), "LSB_QUEUE_PREFIX": qprefix}, tmp_path / "w.log")
    try:
        wait_for(lambda: job_status(redis15, out["cleanup_job"]) in ("finished", "failed"), 90, message="the cleanup job")
        assert job_status(redis15, out["cleanup_job"]) == "finished", worker.log()
    finally:
        worker.stop()
    assert not any(p.exists() for p in doomed)
    assert _project_keys(redis15, pid) == []
    assert all(p.exists() for p in kept) and len(_project_keys(redis15, neighbour)) == 5


def test_project_deleted_stops_a_running_training(redis15, two_projects, qprefix, tmp_path, monkeypatch):
    pid, _ = two_projects
    monkeypatch.setattr(wq, "TRAIN_FUNC", "tests.worker_fixtures.stub_train")
    settings = make_settings(tmp_path, None)
    worker = RQWorker([f"{qprefix}training"], {**settings_env(settings), "LSB_QUEUE_PREFIX": qprefix, "STUB_SECONDS": "60"},
                      tmp_path / "w.log")
    try:
        job_id = wq.request_training(redis15, pid, settings=settings)["job_id"]
        wait_for(lambda: redis15.exists(keys.train_running(pid)), 30, message="the training to start")
        out = handle_event({"action": "PROJECT_DELETED", "project": pid}, redis15, settings).body
        assert out["stopped"] == {job_id: "stopped"}
        wait_for(lambda: job_status(redis15, job_id) == "stopped", 30, message="the training to stop")
    finally:
        worker.stop()
    assert not redis15.lrange(f"test:runs:{pid}", 0, -1)  # it never finished


def _deleted(redis15, settings, pid) -> str:
    handle_event({"action": "PROJECT_DELETED", "project": pid}, redis15, settings)
    return lifecycle.deletion(redis15, pid).stamp


def test_nothing_is_removed_when_the_project_exists_again(redis15, two_projects, qprefix, tmp_path, fake_ls):
    pid, _ = two_projects
    settings = make_settings(tmp_path, fake_ls)
    folders = _populate(settings, redis15, pid)
    stamp = _deleted(redis15, settings, pid)
    fake_ls.add_project(label_config(("Car",)), project_id=pid)
    assert run_cleanup(pid, stamp, settings=settings, redis=redis15)["status"] == "cancelled"
    assert all(p.exists() for p in folders) and lifecycle.deletion(redis15, pid) is None
    assert redis15.get(keys.model_current(pid)) == b"v0001"


def test_nothing_is_removed_after_a_cancelled_or_newer_deletion(redis15, two_projects, qprefix, tmp_path, fake_ls):
    pid, _ = two_projects
    settings = make_settings(tmp_path, fake_ls)
    folders = _populate(settings, redis15, pid)
    stamp = _deleted(redis15, settings, pid)
    assert run_cleanup(pid, "12.000", settings=settings, redis=redis15)["status"] == "cancelled"  # not this deletion
    assert lifecycle.cancel_deletion(redis15, pid, "test")
    assert run_cleanup(pid, stamp, settings=settings, redis=redis15)["status"] == "cancelled"
    assert all(p.exists() for p in folders)


def test_label_studio_down_means_retry_later_not_delete(redis15, two_projects, qprefix, tmp_path, fake_ls):
    pid, _ = two_projects
    settings = make_settings(tmp_path, fake_ls)
    folders = _populate(settings, redis15, pid)
    stamp = _deleted(redis15, settings, pid)
    fake_ls.fail_with(503)
    with pytest.raises(LabelStudioUnavailable):
        run_cleanup(pid, stamp, settings=settings, redis=redis15)
    assert all(p.exists() for p in folders) and lifecycle.deletion(redis15, pid) is not None


def test_without_label_studio_the_marker_is_trusted(redis15, two_projects, qprefix, tmp_path):
    pid, _ = two_projects
    settings = make_settings(tmp_path, None)
    folders = _populate(settings, redis15, pid)
    stamp = _deleted(redis15, settings, pid)
    out = run_cleanup(pid, stamp, settings=settings, redis=redis15)
    assert out["status"] == "cleaned" and not out["label_studio_checked"]
    assert not any(p.exists() for p in folders) and _project_keys(redis15, pid) == []
