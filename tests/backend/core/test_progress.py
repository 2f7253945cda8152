"""backend.core.progress: job meta updates, best effort, no-op outside a job."""

from __future__ import annotations

import time

import pytest
from rq import Queue
from rq.job import Job

from backend.core import progress


@pytest.fixture
def job(redis_client, request):
    queue = Queue(f"test-progress-{request.node.name}", connection=redis_client)
    job = queue.enqueue("os.getpid")
    yield job
    job.delete()
    queue.delete()


def test_report_progress_is_stored_and_stamped(job, redis_client):
    before = time.time()
    assert progress.report_progress({"stage": "training", "epoch": 2}, job)
    stored = Job.fetch(job.id, connection=redis_client).meta["progress"]
    assert stored["stage"] == "training" and stored["epoch"] == 2 and stored["at"] >= round(before, 3) - 0.001


def test_save_meta_merges_fields(job, redis_client):
    progress.save_meta(job, total=3, done=0)
    progress.save_meta(job, done=2)
    assert Job.fetch(job.id, connection=redis_client).meta == {"total": 3, "done": 2}


def test_outside_a_job_nothing_happens():
    assert progress.report_progress({"stage": "x"}) is False
    assert progress.save_meta(done=1) is False


def test_a_redis_failure_never_raises(job, monkeypatch):
    def broken():
        raise ConnectionError("redis went away")

    monkeypatch.setattr(job, "save_meta", broken)
    assert progress.report_progress({"stage": "x"}, job) is False
