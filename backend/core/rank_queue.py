"""Re-score requests: the drafts of a project's un-annotated tasks get a new usefulness score, coalesced.

After a promotion the served model changed, so how much it would learn from each task changed too
(:mod:`backend.serving.usefulness`). The training job and ``lsb rank`` call :func:`request_ranking`;
the job itself is :mod:`worker.jobs.ranking`, enqueued by its dotted path on the ``prelabel`` queue
(ranking is drafts work, and the worker already listens there).

Coalescing: ``lsb:rank:<p>:pending`` names the queued job. A request while that job is still waiting
joins it; the job deletes the marker when it starts, so a promotion during a run queues exactly one
follow-up (the run may have listed the tasks before the new model was current).
"""

from __future__ import annotations

import logging
import time
import uuid

import redis as redis_lib
from rq import Queue
from rq.job import JobStatus

from backend.core import keys
from backend.core.queue import (
    ENQUEUE_GRACE_S,
    PENDING_TTL_S,
    PRELABEL_QUEUE,
    RESULT_TTL_S,
    delete_if_equal,
    delete_if_prefixed,
    fetch_job,
    pending_marker,
    queue_name,
    text,
)

log = logging.getLogger(__name__)

#: RQ function path of the re-score job (backend never imports worker).
RANK_FUNC = "worker.jobs.ranking.rank_project"
RANK_JOB_TIMEOUT_S = 4 * 3600
_WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED}


def _waiting_job(redis: redis_lib.Redis, raw: str) -> str | None:
    """The job id of a pending marker whose job has not started yet (or is being enqueued), else None."""
    job_id, _, stamp = raw.partition(" ")
    job = fetch_job(redis, job_id)
    if job is None:
        try:
            return job_id if time.time() - float(stamp) < ENQUEUE_GRACE_S else None
        except ValueError:
            return None
    return job_id if job.get_status(refresh=False) in _WAITING else None


def request_ranking(redis: redis_lib.Redis, project: str | int, reason: str = "") -> dict:
    """Queue a re-score of ``project``'s drafts unless one is already waiting.

    Returns ``{"status": "queued" | "coalesced", "job_id", "project"}``.
    """
    project = keys.project_key(project)
    pkey = keys.rank_pending(project)
    for _attempt in range(5):
        raw = text(redis.get(pkey))
        if raw:
            waiting = _waiting_job(redis, raw)
            if waiting is not None:
                return {"status": "coalesced", "job_id": waiting, "project": project}
            delete_if_equal(redis, pkey, raw)
        job_id = f"rank-{project}-{uuid.uuid4().hex[:12]}"
        if not redis.set(pkey, pending_marker(job_id), nx=True, ex=PENDING_TTL_S):
            continue  # another request won the race: look again
        try:
            Queue(queue_name(PRELABEL_QUEUE), connection=redis).enqueue(
                RANK_FUNC, project, job_id=job_id, job_timeout=RANK_JOB_TIMEOUT_S, result_ttl=RESULT_TTL_S,
                failure_ttl=RESULT_TTL_S,
                description=f"re-score the drafts of project {project}" + (f" ({reason})" if reason else ""),
                meta={"project": project, "kind": "ranking"})
        except BaseException:
            delete_if_prefixed(redis, pkey, job_id + " ")
            raise
        log.info("re-score of project %s queued as %s (%s)", project, job_id, reason or "asked")
        return {"status": "queued", "job_id": job_id, "project": project}
    raise RuntimeError(f"could not queue a re-score for project {project}: pending marker kept changing")


def ranking_started(redis: redis_lib.Redis, project: str | int, job_id: str) -> None:
    """Called by the job as it starts: later requests queue a follow-up instead of joining this run."""
    delete_if_prefixed(redis, keys.rank_pending(project), job_id + " ")


def rank_after_promotion(redis: redis_lib.Redis, project: str | int, settings) -> dict | None:
    """The training job's hook: queue a re-score when ``PREDICTION_SCORE=usefulness``; never fails the training."""
    if getattr(settings, "prediction_score", "usefulness") != "usefulness":
        return None
    try:
        return request_ranking(redis, project, reason="promotion")
    except Exception as exc:  # the promotion stands; `lsb rank` re-scores later
        log.warning("re-score after the promotion of project %s not queued: %s: %s", project, type(exc).__name__, exc)
        return None
