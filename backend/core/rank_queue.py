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

import redis as redis_lib
from rq import Queue
from rq.job import JobStatus

from backend.core import keys
from backend.core.queue import PRELABEL_QUEUE, RESULT_TTL_S, coalesce_or_enqueue, delete_if_prefixed, queue_name

log = logging.getLogger(__name__)

#: RQ function path of the re-score job (backend never imports worker).
RANK_FUNC = "worker.jobs.ranking.rank_project"
RANK_JOB_TIMEOUT_S = 4 * 3600
_WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED}


def request_ranking(redis: redis_lib.Redis, project: str | int, reason: str = "") -> dict:
    """Queue a re-score of ``project``'s drafts unless one is already waiting (a started one does not count).

    Returns ``{"status": "queued" | "coalesced", "job_id", "project"}``.
    """
    project = keys.project_key(project)

    def enqueue(job_id: str) -> None:
        Queue(queue_name(PRELABEL_QUEUE), connection=redis).enqueue(
            RANK_FUNC, project, job_id=job_id, job_timeout=RANK_JOB_TIMEOUT_S, result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S,
            description=f"re-score the drafts of project {project}" + (f" ({reason})" if reason else ""),
            meta={"project": project, "kind": "ranking"})

    status, job_id = coalesce_or_enqueue(redis, keys.rank_pending(project), f"rank-{project}", enqueue, _WAITING)
    if status == "queued":
        log.info("re-score of project %s queued as %s (%s)", project, job_id, reason or "asked")
    return {"status": status, "job_id": job_id, "project": project}


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
