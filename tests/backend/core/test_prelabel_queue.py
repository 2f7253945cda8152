"""Pre-labeling requests: one job per task, compare-and-set claims, ended jobs taken over, pruning.

No worker: job states are written through rq's API.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from backend.core import keys
from backend.core import prelabel_queue as pq
from backend.core.connection import connect
from tests.paths import TEST_REDIS_URL


def _prelabel_jobs(redis15, qprefix) -> list[Job]:
    return Queue(f"{qprefix}prelabel", connection=redis15).get_jobs()


def _tasks(*ids: int) -> list[dict]:
    return [{"id": i, "data": {"image": f"https://example.com/{i}.jpg"}} for i in ids]


@pytest.fixture
def prelabel_keys(redis15, project_id):
    yield
    redis15.delete(keys.prelabel_queued(project_id), keys.prelabel_tasks(project_id), keys.prelabel_status(project_id))


def test_prelabel_for_tasks_already_queued_adds_nothing(redis15, project_id, qprefix, prelabel_keys):
    first = pq.request_prelabel(redis15, project_id, tasks=_tasks(1, 2, 3))
    again = pq.request_prelabel(redis15, project_id, tasks=_tasks(3, 2, 1))
    assert first["status"] == "queued" and first["tasks"] == 3
    assert again == {"status": "coalesced", "job_id": first["job_id"], "project": str(project_id), "tasks": 0, "coalesced": 3}
    overlap = pq.request_prelabel(redis15, project_id, tasks=_tasks(3, 4, 4))
    assert overlap["status"] == "queued" and overlap["tasks"] == 1 and overlap["coalesced"] == 2
    jobs = _prelabel_jobs(redis15, qprefix)
    assert [[t["id"] for t in j.args[1]] for j in jobs] == [[1, 2, 3], [4]]
    assert pq.enqueue_prelabel(redis15, project_id, tasks=_tasks(4)) == overlap["job_id"]  # the old API: the holder's id


@pytest.mark.parametrize("state", ["finished", "failed", "stopped", "canceled", "missing"])
def test_prelabel_tasks_of_an_ended_job_are_queued_again(redis15, project_id, qprefix, prelabel_keys, state, monkeypatch):
    monkeypatch.setattr(pq, "ENQUEUE_GRACE_S", 0.0)  # a missing job's marker is not "being enqueued"
    first = pq.request_prelabel(redis15, project_id, tasks=_tasks(1, 2))
    job = Job.fetch(first["job_id"], connection=redis15)
    if state == "missing":
        job.delete()
    else:
        job.set_status(JobStatus(state), pipeline=None)
    again = pq.request_prelabel(redis15, project_id, tasks=_tasks(1, 2))
    assert again["status"] == "queued" and again["job_id"] != first["job_id"] and again["tasks"] == 2


def test_prelabel_started_job_with_a_dead_worker_no_longer_holds_its_tasks(redis15, project_id, qprefix, prelabel_keys):
    first = pq.request_prelabel(redis15, project_id, tasks=_tasks(1))
    job = Job.fetch(first["job_id"], connection=redis15)
    job.set_status(JobStatus.STARTED, pipeline=None)
    job.last_heartbeat = datetime.now(UTC)
    job.save()
    assert pq.request_prelabel(redis15, project_id, tasks=_tasks(1))["status"] == "coalesced"  # alive: it drafts task 1
    job.last_heartbeat = datetime(2000, 1, 1, tzinfo=UTC)
    job.save()
    assert pq.request_prelabel(redis15, project_id, tasks=_tasks(1))["status"] == "queued"


def test_prelabel_whole_project_runs_coalesce_while_queued(redis15, project_id, qprefix, prelabel_keys):
    whole = pq.request_prelabel(redis15, project_id)
    assert whole["status"] == "queued" and Job.fetch(whole["job_id"], connection=redis15).args[1] is None
    assert pq.request_prelabel(redis15, project_id)["status"] == "coalesced"
    covered = pq.request_prelabel(redis15, project_id, tasks=_tasks(7))
    assert covered["status"] == "coalesced" and covered["job_id"] == whole["job_id"]
    job = Job.fetch(whole["job_id"], connection=redis15)
    job.set_status(JobStatus.STARTED, pipeline=None)  # it may have listed the tasks already
    job.last_heartbeat = datetime.now(UTC)
    job.save()
    assert pq.request_prelabel(redis15, project_id, tasks=_tasks(7))["status"] == "queued"
    assert pq.request_prelabel(redis15, project_id)["status"] == "queued"


def test_prelabel_concurrent_requests_for_the_same_tasks_queue_one_job(redis15, project_id, qprefix, prelabel_keys):
    def ask(_):
        client = connect(TEST_REDIS_URL, timeout=2.0)
        return pq.request_prelabel(client, project_id, tasks=_tasks(*range(1, 41)))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(16)))
    jobs = _prelabel_jobs(redis15, qprefix)
    assert sum(len(j.args[1]) for j in jobs) == 40  # every task queued exactly once
    assert sorted(t["id"] for j in jobs for t in j.args[1]) == list(range(1, 41))
    assert sum(r["tasks"] for r in results) == 40


def test_prelabel_hash_is_pruned_of_ended_jobs(redis15, project_id, qprefix, prelabel_keys, monkeypatch):
    monkeypatch.setattr(pq, "PRELABEL_PRUNE_AT", 3)
    first = pq.request_prelabel(redis15, project_id, tasks=_tasks(1, 2, 3))
    Job.fetch(first["job_id"], connection=redis15).set_status(JobStatus.FINISHED, pipeline=None)
    pq.request_prelabel(redis15, project_id, tasks=_tasks(4))  # 4 fields > 3: the finished job's are dropped
    assert sorted(redis15.hkeys(keys.prelabel_queued(project_id))) == [b"4"]


class _RaceAfterRead:
    """A client whose first HMGET lets a competing request run to the end before the caller goes on."""

    def __init__(self, inner, competitor):
        self._inner, self._competitor = inner, competitor

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def hmget(self, *args, **kwargs):
        out = self._inner.hmget(*args, **kwargs)
        if self._competitor is not None:
            competitor, self._competitor = self._competitor, None
            competitor()
        return out


def test_prelabel_claim_is_compare_and_set(redis15, project_id, qprefix, prelabel_keys):
    """Both requests read the tasks as free; only the one that claims first queues them (deterministic race)."""
    results = []
    competitor = lambda: results.append(pq.request_prelabel(redis15, project_id, tasks=_tasks(1, 2, 3)))  # noqa: E731
    late = pq.request_prelabel(_RaceAfterRead(redis15, competitor), project_id, tasks=_tasks(1, 2, 3))
    assert results[0]["status"] == "queued" and late["status"] == "coalesced" and late["job_id"] == results[0]["job_id"]
    assert len(_prelabel_jobs(redis15, qprefix)) == 1
