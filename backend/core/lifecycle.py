"""A project's end: PROJECT_DELETED marks it, stops its work and schedules its cleanup after a grace period.

Label Studio deletes a project with its tasks and annotations; what this service keeps for it (model
versions in ``MODEL_DIR/<p>``, datasets and rejected candidates in ``DATA_DIR``, Redis keys) would stay
forever. On ``PROJECT_DELETED`` the web process (light: Redis and rq only):

1. sets ``lsb:project:<p>:deleted`` to "<time> <cleanup job id>" (the first deletion wins; repeats are
   no-ops), so trainings are refused and further events of the project are ignored;
2. cancels the queued training and pre-labeling jobs and asks the worker running one of them to stop it;
3. enqueues ``worker.jobs.cleanup.cleanup_project`` on the training queue ``PROJECT_DELETE_GRACE_HOURS``
   later (rq's scheduler: workers run with ``--with-scheduler``; 0 = at once).

The grace period is there because a deletion can be a mistake or a replay: the cleanup job first asks
Label Studio whether the project exists; if it does (re-created, or the event was not real), or if the
deletion was cancelled meanwhile (:func:`cancel_deletion`, called when an event shows a project with
that id created after the deletion), nothing is removed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis as redis_lib
from rq import Queue, Retry
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from backend.core import keys
from backend.core.prelabel_queue import prelabel_job_ids
from backend.core.queue import (
    RESULT_TTL_S,
    TRAINING_QUEUE,
    delete_if_equal,
    queue_name,
    text,
)
from backend.core.settings import get_settings

log = logging.getLogger(__name__)

#: RQ function path of the cleanup job (the web enqueues by name: backend never imports worker).
CLEANUP_FUNC = "worker.jobs.cleanup.cleanup_project"
#: Back-off when Label Studio cannot say whether the project exists (unreachable, auth error).
CLEANUP_RETRY_INTERVALS = [600, 3600, 6 * 3600]
_WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED}


@dataclass(frozen=True)
class Deletion:
    """What ``lsb:project:<p>:deleted`` holds."""

    raw: str
    at: float
    job_id: str

    @property
    def stamp(self) -> str:
        return self.raw.partition(" ")[0]


def deletion(redis: redis_lib.Redis, project: str | int) -> Deletion | None:
    """The project's deletion marker, or None when it is not (or no longer) marked deleted."""
    raw = text(redis.get(keys.project_deleted(project)))
    if not raw:
        return None
    stamp, _, job_id = raw.partition(" ")
    try:
        return Deletion(raw, float(stamp), job_id)
    except ValueError:
        return Deletion(raw, 0.0, job_id)


def _job(redis: redis_lib.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=redis) if job_id else None
    except NoSuchJobError:
        return None


def _halt(redis: redis_lib.Redis, job_id: str) -> str | None:
    """Cancel a waiting job, ask the worker to stop a started one; what was done (None: nothing)."""
    job = _job(redis, job_id)
    if job is None:
        return None
    status = job.get_status(refresh=False)
    try:
        if status in _WAITING:
            job.cancel()
            return "canceled"
        if status == JobStatus.STARTED:
            send_stop_job_command(redis, job_id)
            return "stopped"
    except (InvalidJobOperation, NoSuchJobError) as exc:  # it ended meanwhile
        log.info("job %s: %s", job_id, exc)
    return None


def stop_project_work(redis: redis_lib.Redis, project: str | int) -> dict[str, str]:
    """Cancel or stop the project's training and pre-labeling jobs; {job id: what was done}."""
    project = keys.project_key(project)
    ids: list[str] = []
    pending = text(redis.get(keys.train_pending(project)))
    if pending:
        ids.append(pending.partition(" ")[0])
    running = text(redis.get(keys.train_running(project)))
    if running:
        try:
            ids.append(str(json.loads(running).get("job_id") or ""))
        except (ValueError, AttributeError):
            pass
    ids.extend(sorted(prelabel_job_ids(redis, project)))
    done = {job_id: outcome for job_id in dict.fromkeys(i for i in ids if i) if (outcome := _halt(redis, job_id))}
    if pending:
        delete_if_equal(redis, keys.train_pending(project), pending)
    redis.delete(keys.prelabel_queued(project), keys.train_force(project))
    return done


def mark_project_deleted(redis: redis_lib.Redis, project: str | int, settings: Any = None) -> dict:
    """PROJECT_DELETED: mark, stop, and schedule the cleanup (idempotent: a repeat changes nothing)."""
    settings = settings if settings is not None else get_settings()
    project = keys.project_key(project)
    now = time.time()
    job_id = f"cleanup-{project}-{int(now * 1000)}"
    stamp = f"{now:.3f}"
    key = keys.project_deleted(project)
    if not redis.set(key, f"{stamp} {job_id}", nx=True):
        known = deletion(redis, project)
        return {"status": "already_deleted", "project": project, "deleted_at": known.at if known else None,
                "cleanup_job": known.job_id if known else None}
    grace_h = float(settings.project_delete_grace_hours)
    try:
        stopped = stop_project_work(redis, project)
        queue = Queue(queue_name(TRAINING_QUEUE), connection=redis)
        options = dict(job_id=job_id, job_timeout=3600, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
                       retry=Retry(max=len(CLEANUP_RETRY_INTERVALS), interval=CLEANUP_RETRY_INTERVALS),
                       description=f"clean up deleted project {project}", meta={"project": project, "kind": "cleanup"})
        if grace_h > 0:
            queue.enqueue_in(timedelta(hours=grace_h), CLEANUP_FUNC, project, stamp, **options)
        else:
            queue.enqueue(CLEANUP_FUNC, project, stamp, **options)
    except BaseException:
        delete_if_equal(redis, key, f"{stamp} {job_id}")
        raise
    log.warning("project %s deleted in Label Studio: work stopped (%s), cleanup %s in %.1f h", project, stopped or "none",
                job_id, grace_h)
    return {"status": "deleted", "project": project, "deleted_at": now, "cleanup_job": job_id,
            "cleanup_in_hours": grace_h, "stopped": stopped}


def cancel_deletion(redis: redis_lib.Redis, project: str | int, reason: str) -> bool:
    """The project exists again: drop the marker and cancel the scheduled cleanup. True if it was marked."""
    known = deletion(redis, project)
    if known is None:
        return False
    job = _job(redis, known.job_id)
    if job is not None and job.get_status(refresh=False) in _WAITING:  # never stop a cleanup already running
        _halt(redis, known.job_id)
    cancelled = delete_if_equal(redis, keys.project_deleted(project), known.raw)
    if cancelled:
        log.warning("project %s: deletion cancelled (%s); nothing was removed", keys.project_key(project), reason)
    return cancelled
