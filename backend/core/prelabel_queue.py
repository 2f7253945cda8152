"""Pre-labeling requests: which job drafts which task, so an import is drafted once.

Coalescing, like trainings: ``lsb:prelabel:<p>:queued`` maps each task id queued for drafting (and
"*" for a whole-project run) to "<job id> <time>". A request drafts only the tasks no *live* job
holds: queued, scheduled for a retry, or started with a heartbeat (a started job has its task list
in its arguments, so it will draft them). A whole-project run covers later requests only while it is
still queued (once started it may have listed the tasks already). Entries of finished, failed or
missing jobs are stale and taken over; the hash expires PENDING_TTL_S after the last request and is
pruned of stale entries when it grows past PRELABEL_PRUNE_AT fields.

The web, the CLI and the project clean-up call this; the job itself is :mod:`worker.jobs.prelabeling`,
enqueued by its dotted path.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis as redis_lib
from rq import Queue, Retry
from rq.job import Job, JobStatus

from backend.core import import_status, keys
from backend.core.queue import (
    ENQUEUE_GRACE_S,
    LIVE_STATUSES,
    PENDING_TTL_S,
    PRELABEL_FUNC,
    PRELABEL_QUEUE,
    RESULT_TTL_S,
    STALE_HEARTBEAT_S,
    age_s,
    fetch_job,
    pending_marker,
    queue_name,
    text,
)

ALL_TASKS = "*"
PRELABEL_PRUNE_AT = 20_000
_WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED}

#: Claim hash fields whose value is still what the caller saw ("" = absent); returns the claimed fields.
_CLAIM_FIELDS = """
local claimed = {}
for i = 3, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if (not current and ARGV[i + 1] == '') or current == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    claimed[#claimed + 1] = ARGV[i]
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return claimed
"""
#: Delete hash fields that still hold ARGV[1].
_RELEASE_FIELDS = """
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then n = n + redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return n
"""


def _marker_live(redis: redis_lib.Redis, raw: str | None, whole_project: bool, jobs: dict[str, Job | None]) -> bool:
    """Is the job a ``lsb:prelabel`` entry names still going to draft its tasks?"""
    if not raw:
        return False
    job_id, _, stamp = raw.partition(" ")
    if job_id not in jobs:
        jobs[job_id] = fetch_job(redis, job_id)
    job = jobs[job_id]
    if job is None:
        try:
            return time.time() - float(stamp) < ENQUEUE_GRACE_S  # being enqueued right now
        except ValueError:
            return False
    status = job.get_status(refresh=False)
    if whole_project:
        return status in _WAITING
    if status == JobStatus.STARTED:
        age = age_s(job.last_heartbeat or job.started_at)
        return age is None or age <= STALE_HEARTBEAT_S
    return status in LIVE_STATUSES


def _task_field(task: dict) -> str | None:
    tid = task.get("id")
    if isinstance(tid, bool) or not isinstance(tid, int | str) or not str(tid).isdigit():
        return None  # no usable id: never coalesced
    return str(int(tid))


def request_prelabel(redis: redis_lib.Redis, project: str | int, tasks: list[dict] | None = None,
                     label_config: str | None = None, settings: Any = None) -> dict:
    """Queue a pre-labeling job for the tasks no live job holds yet.

    ``tasks=None`` means every task of the project lacking a current draft. Returns ``{"status":
    "queued" | "coalesced", "job_id", "project", "tasks", "coalesced"}``: ``job_id`` is the new job, or
    (when nothing was left to queue) the live job that already holds the tasks; ``"refused"`` (no job) for
    a project marked deleted.
    """
    project = keys.project_key(project)
    if redis.exists(keys.project_deleted(project)):  # PROJECT_DELETED seen: see backend.core.lifecycle
        return {"status": "refused", "job_id": None, "project": project, "tasks": 0, "coalesced": 0}
    hkey = keys.prelabel_queued(project)
    fields = [ALL_TASKS] if tasks is None else [f for f in dict.fromkeys(_task_field(t) for t in tasks) if f]
    jobs: dict[str, Job | None] = {}
    seen = [text(v) for v in redis.hmget(hkey, fields)] if fields else []
    if tasks is not None:  # a queued whole-project run covers these tasks too
        whole = text(redis.hget(hkey, ALL_TASKS))
        if _marker_live(redis, whole, True, jobs):
            return {"status": "coalesced", "job_id": whole.partition(" ")[0], "project": project, "tasks": 0,
                    "coalesced": len(tasks)}
    free = [(f, raw) for f, raw in zip(fields, seen, strict=True) if not _marker_live(redis, raw, f == ALL_TASKS, jobs)]
    job_id = f"prelabel-{project}-{uuid.uuid4().hex[:12]}"
    value = pending_marker(job_id)
    args = [value, PENDING_TTL_S] + [x for f, raw in free for x in (f, raw or "")]
    claimed = {text(f) for f in redis.eval(_CLAIM_FIELDS, 1, hkey, *args)} if free else set()
    if tasks is None:
        chosen = None if claimed else []
    else:
        chosen = [t for t in tasks if (field := _task_field(t)) is None or field in claimed]
        chosen = list({(_task_field(t) or id(t)): t for t in chosen}.values())  # one entry per task id
    if chosen == []:
        holders = [text(raw) for raw in redis.hmget(hkey, fields)] if fields else []
        holder = next((h.partition(" ")[0] for h in holders if h), None)
        return {"status": "coalesced", "job_id": holder, "project": project, "tasks": 0,
                "coalesced": len(fields) if tasks is not None else 1}
    slim = None if chosen is None else [{"id": t.get("id"), "data": t.get("data") or {}} for t in chosen]
    if slim:  # the visible status of the import; before the job exists, so a fast job's "drafted" is not undone
        import_status.mark_queued(redis, project, slim)
    try:
        Queue(queue_name(PRELABEL_QUEUE), connection=redis).enqueue(
            PRELABEL_FUNC, project, slim, label_config,
            job_id=job_id,
            job_timeout=max(600, 60 * (len(slim or []) // 50 + 1)),
            retry=Retry(max=3, interval=[10, 60, 300]),
            result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S,
            description=f"pre-label project {project} ({'all' if slim is None else len(slim)} tasks)",
            meta={"project": project, "kind": "prelabel"},
        )
    except BaseException:
        if claimed:
            redis.eval(_RELEASE_FIELDS, 1, hkey, value, *claimed)
        raise
    if redis.hlen(hkey) > PRELABEL_PRUNE_AT:
        prune_prelabel_markers(redis, project)
    total = len(tasks) if tasks is not None else 0
    return {"status": "queued", "job_id": job_id, "project": project, "tasks": len(slim) if slim is not None else None,
            "coalesced": total - len(slim) if slim is not None else 0}


def prune_prelabel_markers(redis: redis_lib.Redis, project: str | int) -> int:
    """Drop the entries of jobs that will not draft anymore (bounds the hash); returns how many."""
    hkey = keys.prelabel_queued(project)
    jobs: dict[str, Job | None] = {}
    removed = 0
    for field, raw in redis.hscan_iter(hkey, count=1000):
        value = text(raw)
        if not _marker_live(redis, value, text(field) == ALL_TASKS, jobs):
            removed += int(redis.eval(_RELEASE_FIELDS, 1, hkey, value, text(field)))
    return removed


def prelabel_job_ids(redis: redis_lib.Redis, project: str | int) -> set[str]:
    """Every job id the project's pre-labeling entries name (to cancel them when the project is deleted)."""
    return {text(raw).partition(" ")[0] for _f, raw in redis.hscan_iter(keys.prelabel_queued(project), count=1000)}


def enqueue_prelabel(redis: redis_lib.Redis, project: str | int, tasks: list[dict] | None = None,
                     label_config: str | None = None, settings: Any = None) -> str | None:
    """:func:`request_prelabel`, returning only the job id that will draft the tasks (kept for callers)."""
    return request_prelabel(redis, project, tasks=tasks, label_config=label_config, settings=settings)["job_id"]
