"""Scheduling the polls of Gemini batches: one RQ job per poll, run later by the worker's scheduler.

The poll job is :func:`worker.jobs.batch_drafting.poll_batch`, enqueued by its dotted path with
``enqueue_in`` (the worker runs ``--with-scheduler``). Everything a poll needs is in Redis
(keys.gbatch*), so a batch survives worker restarts: the scheduled poll lives in RQ's scheduled
registry, and :func:`poll_delay` gives the back-off.
"""

from __future__ import annotations

import datetime as dt

import redis as redis_lib
from rq import Queue, Retry

from backend.core.queue import PRELABEL_QUEUE, RESULT_TTL_S, queue_name

POLL_FUNC = "worker.jobs.batch_drafting.poll_batch"
POLL_BACKOFF = 1.5


def poll_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds before poll number ``attempt`` (0 = the first): ``initial_s * 1.5**attempt``, at most ``max_s``."""
    return min(max_s, initial_s * POLL_BACKOFF ** max(0, attempt))


def schedule_poll(redis: redis_lib.Redis, project: str | int, batch: str, attempt: int, delay_s: float) -> str:
    """Enqueue the batch's next poll ``delay_s`` seconds from now; returns the job id."""
    job = Queue(queue_name(PRELABEL_QUEUE), connection=redis).enqueue_in(
        dt.timedelta(seconds=max(0.0, delay_s)), POLL_FUNC, str(project), batch, attempt,
        job_id=f"gbatch-poll-{project}-{batch}-{attempt}", job_timeout=1800, retry=Retry(max=3, interval=[10, 60, 300]),
        result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S, description=f"poll Gemini batch {batch} of project {project}",
        meta={"project": str(project), "kind": "gbatch-poll"},
    )
    return job.id
