"""Scheduling the polls of Gemini batches, and the sweep that resumes a batch whose poll died.

The poll job is :func:`worker.jobs.batch_drafting.poll_batch`, enqueued by its dotted path with
``enqueue_in`` (the worker runs ``--with-scheduler``). Everything a poll needs is in Redis
(keys.gbatch*), so a batch survives worker restarts: the scheduled poll lives in RQ's scheduled
registry, and :func:`poll_delay` gives the back-off.

One poll chain per batch: the batch's hash names its current poll job (``poll_job``), replaced only by
compare-and-set (:func:`schedule_poll` with ``expect``); a poll job that is not the one named there is a
leftover (an RQ retry of a poll the sweep replaced) and does nothing.

Why a sweep: a poll killed with its worker (SIGKILL, OOM, a lost machine) stays "started" in RQ until its
timeout (30 min) and holds the batch's lock (``LOCK_S``). :func:`sweep` runs as a scheduled job every
``GEMINI_BATCH_SWEEP_S`` while a batch is live (and is due at once when a worker starts after an outage,
since the scheduled sweep waits in RQ's registry): for each live batch it breaks a lock whose holder is
dead (the lock names its job, worker, host and pid) and schedules a new poll when the current one is
missing, ended, or started on a dead worker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
import uuid

import redis as redis_lib
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus

from backend.core import keys
from backend.core.queue import (
    PRELABEL_QUEUE,
    RESULT_TTL_S,
    STALE_HEARTBEAT_S,
    age_s,
    coalesce_or_enqueue,
    delete_if_equal,
    delete_if_prefixed,
    fetch_job,
    queue_name,
    text,
)

log = logging.getLogger(__name__)

POLL_FUNC = "worker.jobs.batch_drafting.poll_batch"
SWEEP_FUNC = "worker.jobs.batch_drafting.sweep_batches"
POLL_BACKOFF = 1.5
#: The poll's lock outlives a poll job (1800 s timeout); the sweep breaks it sooner when its holder is dead.
LOCK_S = 1900
POLL_TIMEOUT_S = 1800
#: A poll job in one of these states will run (or runs): its batch needs nothing from the sweep.
WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED}

#: Set hash field ARGV[1] to ARGV[3] only if it holds ARGV[2] ("" = absent); 1 when set.
_CAS_FIELD = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


def poll_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds before poll number ``attempt`` (0 = the first): ``initial_s * 1.5**attempt``, at most ``max_s``."""
    return min(max_s, initial_s * POLL_BACKOFF ** max(0, attempt))


def schedule_poll(redis: redis_lib.Redis, project: str | int, batch: str, attempt: int, delay_s: float,
                  expect: str | None = None) -> str | None:
    """Make a new poll ``delay_s`` seconds from now the batch's current one; returns its job id.

    ``expect``: the poll job this one replaces (the caller's own job, or a dead one the sweep found); when
    the batch names another one by now, nothing is scheduled and None is returned (someone else resumed it).
    ``None`` schedules unconditionally (the first poll, right after submission)."""
    job_id = f"gbatch-poll-{keys.project_key(project)}-{batch}-{attempt}-{uuid.uuid4().hex[:6]}"
    state, queue = keys.gbatch(project, batch), queue_name(PRELABEL_QUEUE)
    if expect is not None and not redis.eval(_CAS_FIELD, 1, state, "poll_job", expect, job_id):
        return None
    redis.hset(state, mapping={"poll_job": job_id, "attempt": attempt, "queue": queue})
    Queue(queue, connection=redis).enqueue_in(
        dt.timedelta(seconds=max(0.0, delay_s)), POLL_FUNC, str(project), batch, attempt,
        job_id=job_id, job_timeout=POLL_TIMEOUT_S, retry=Retry(max=3, interval=[10, 60, 300]),
        result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S, description=f"poll Gemini batch {batch} of project {project}",
        meta={"project": str(project), "kind": "gbatch-poll"},
    )
    return job_id


def ensure_sweep(redis: redis_lib.Redis, delay_s: float) -> str:
    """A sweep scheduled ``delay_s`` from now unless one is already waiting or running; returns its job id."""
    def enqueue(job_id: str) -> None:
        Queue(queue_name(PRELABEL_QUEUE), connection=redis).enqueue_in(
            dt.timedelta(seconds=max(0.0, delay_s)), SWEEP_FUNC, job_id=job_id, job_timeout=300,
            retry=Retry(max=3, interval=[10, 30, 60]), result_ttl=600, failure_ttl=RESULT_TTL_S,
            description="sweep the live Gemini batches", meta={"kind": "gbatch-sweep"})

    return coalesce_or_enqueue(redis, keys.gbatch_sweep(queue_name(PRELABEL_QUEUE)), "gbatch-sweep", enqueue)[1]


def release_sweep(redis: redis_lib.Redis, job_id: str) -> None:
    """The running sweep clears its own marker, so that it can schedule the next one."""
    delete_if_prefixed(redis, keys.gbatch_sweep(queue_name(PRELABEL_QUEUE)), job_id + " ")


# --- who holds what ----------------------------------------------------------------------------------

def lock_value(job_id: str | None, worker_name: str | None) -> str:
    """The poll lock's value: enough to tell later whether its holder still lives."""
    return json.dumps({"job": job_id or "", "worker": worker_name or "", "host": socket.gethostname(),
                       "pid": os.getpid(), "since": round(time.time(), 3), "token": uuid.uuid4().hex})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_alive(redis: redis_lib.Redis, name: str | None) -> bool:
    """Registered with RQ, its heartbeat fresh, and (on this host) its process there."""
    if not name:
        return False
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=redis)
    if worker is None:
        return False
    if worker.hostname == socket.gethostname() and worker.pid and not _pid_alive(worker.pid):
        return False
    age = age_s(worker.last_heartbeat)
    return age is None or age <= STALE_HEARTBEAT_S


def job_running(redis: redis_lib.Redis, job: Job) -> bool:
    """A started job whose worker lives (RQ itself calls it abandoned only after its timeout)."""
    if job.get_status(refresh=False) != JobStatus.STARTED:
        return False
    age = age_s(job.last_heartbeat or job.started_at)
    if age is not None and age > STALE_HEARTBEAT_S:
        return False
    return _worker_alive(redis, job.worker_name)


def holder_alive(redis: redis_lib.Redis, raw: str) -> bool:
    """Whether the poll that wrote lock value ``raw`` may still run. A value of another format counts as alive
    (it expires with its TTL)."""
    try:
        holder = json.loads(raw)
        job_id, worker, host, pid = holder["job"], holder["worker"], holder["host"], int(holder["pid"])
    except (ValueError, KeyError, TypeError):
        return True
    if host == socket.gethostname() and not _pid_alive(pid):
        return False  # the work horse is gone: the quickest answer, no RQ state needed
    if not job_id:
        return True  # a poll run outside RQ (tests, lsb): only its pid can tell
    job = fetch_job(redis, job_id)
    if job is None or (worker and job.worker_name and job.worker_name != worker):
        return False  # the job is gone, or runs again on another worker
    return job_running(redis, job)


def break_dead_lock(redis: redis_lib.Redis, project: str | int, batch: str) -> bool:
    """Delete the batch's poll lock if its holder is dead (compare-and-delete: a new holder's lock stays)."""
    lock = keys.gbatch_lock(project, batch)
    raw = text(redis.get(lock))
    if raw is None or holder_alive(redis, raw):
        return False
    broken = delete_if_equal(redis, lock, raw)
    if broken:
        log.warning("gemini batch %s of project %s: broke the poll lock of a dead holder %s", batch, project, raw)
    return broken


# --- the sweep -------------------------------------------------------------------------------------

def poll_verdict(redis: redis_lib.Redis, poll_job: str | None) -> str:
    """``waiting`` / ``running`` (leave it alone) or ``dead`` (resume the batch) for the batch's current poll job."""
    job = fetch_job(redis, poll_job) if poll_job else None
    if job is None:
        return "dead"
    status = job.get_status(refresh=False)
    if status in WAITING:
        return "waiting"
    return "running" if job_running(redis, job) else "dead"


def sweep(redis: redis_lib.Redis) -> dict:
    """Resume every live batch of this queue whose poll died; forget batches that are finished or gone. Returns counts.

    A batch polled on another queue (``LSB_QUEUE_PREFIX``: another deployment or test sharing the Redis) is
    left to that queue's sweep, whose workers hold that deployment's settings."""
    counts = {"live": 0, "resumed": 0, "locks_broken": 0, "forgotten": 0}
    own = queue_name(PRELABEL_QUEUE)
    for member in sorted(text(m) or "" for m in redis.smembers(keys.gbatch_live())):
        project, _, batch = member.partition(":")
        try:
            state_key = keys.gbatch(project, batch)
        except ValueError:
            redis.srem(keys.gbatch_live(), member)
            continue
        state = {text(k): text(v) for k, v in redis.hgetall(state_key).items()}
        if state.get("status") != "running":
            redis.srem(keys.gbatch_live(), member)  # finished, or its state expired: nothing to poll
            counts["forgotten"] += 1
            continue
        if state.get("queue", own) != own:
            continue
        counts["live"] += 1
        poll_job = state.get("poll_job")
        verdict = poll_verdict(redis, poll_job)
        if verdict != "running":
            counts["locks_broken"] += int(break_dead_lock(redis, project, batch))
        if verdict != "dead":
            continue
        attempt = int(state.get("attempt") or 0)
        new = schedule_poll(redis, project, batch, attempt, 0.0, expect=poll_job or "")
        if new is not None:
            redis.hincrby(state_key, "resumes", 1)
            counts["resumed"] += 1
            log.warning("gemini batch %s of project %s: poll job %s is dead; resumed by %s", batch, project, poll_job, new)
    return counts
