"""The enqueue/status API the web uses: training requests with coalescing, pre-labeling, status.

Light imports only (every web request path imports this). Queues: ``training`` and ``prelabel``
(``LSB_QUEUE_PREFIX`` is prepended, e.g. for tests). Start workers with the scheduler so retries
with back-off run: ``rq worker --with-scheduler --url $REDIS_URL training prelabel``. The Redis keys
are listed in :mod:`backend.core.keys`; the running lock lives with the worker
(:mod:`worker.training.lock`).

Coalescing: :func:`request_training` enqueues a job only when no *live* pending job exists; the
pending marker is ignored (and replaced) when its RQ job is failed, stopped, canceled, finished or
missing, or "started" without a worker heartbeat for ``STALE_HEARTBEAT_S``; a marker younger than
``ENQUEUE_GRACE_S`` whose job is not visible yet counts as live (it is being enqueued). A training
job clears the marker only once it holds the project's running lock, so per project there is at
most one queued and one running training, and any request during a run schedules exactly one
follow-up.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis as redis_lib
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.core import keys
from backend.core.registry import ModelRegistry
from backend.core.settings import get_settings

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
PRELABEL_QUEUE = "prelabel"
#: RQ function path of the training job (tests point it at a cheap stub).
TRAIN_FUNC = "worker.jobs.training.train_project"
#: RQ function path of the pre-labeling job (the web enqueues by name: backend never imports worker).
PRELABEL_FUNC = "worker.jobs.prelabeling.prelabel_tasks"
#: Retry back-off (seconds) when Label Studio is unreachable (``LSB_TRAIN_RETRY_INTERVALS="30,120,600"``);
#: other errors are not retried.
RETRY_INTERVALS = (30, 120, 600)
PENDING_TTL_S = 7 * 24 * 3600
RESULT_TTL_S = 7 * 24 * 3600
ENQUEUE_GRACE_S = 10.0
STALE_HEARTBEAT_S = 150.0
_LIVE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED, JobStatus.CREATED}

_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
"""
#: INCR that also says whether the counter existed: a missing counter of a project that has a model means
#: Redis lost it (flushed, restored from an older snapshot), since a training leaves it at 0.
_COUNT_EVENT = """
local existed = redis.call('EXISTS', KEYS[1])
return {existed, redis.call('INCR', KEYS[1])}
"""
_DELETE_IF_PREFIXED = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
"""


# --- names ---------------------------------------------------------------------------------------

def queue_name(kind: str = TRAINING_QUEUE) -> str:
    return os.environ.get("LSB_QUEUE_PREFIX", "") + kind


def retry_intervals() -> list[int]:
    raw = os.environ.get("LSB_TRAIN_RETRY_INTERVALS", "")
    values = [int(v) for v in raw.split(",") if v.strip()] if raw.strip() else list(RETRY_INTERVALS)
    return values or list(RETRY_INTERVALS)


# --- small Redis helpers (also used by the worker's lock) ------------------------------------------

def text(value: Any) -> str | None:
    """A Redis reply as ``str`` (replies are bytes, see :mod:`backend.core.connection`)."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def delete_if_equal(redis: redis_lib.Redis, key: str, value: str) -> bool:
    """Delete ``key`` only if it still holds ``value`` (atomic compare-and-delete)."""
    return bool(redis.eval(_DELETE_IF_EQUAL, 1, key, value))


def delete_if_prefixed(redis: redis_lib.Redis, key: str, prefix: str) -> bool:
    """Delete ``key`` only if its value starts with ``prefix`` (a pending marker naming one job)."""
    return bool(redis.eval(_DELETE_IF_PREFIXED, 1, key, prefix))


def pending_marker(job_id: str) -> str:
    """The value of ``lsb:train:<p>:pending``: the job id, then when it was set."""
    return f"{job_id} {time.time():.3f}"


def pending_names(redis: redis_lib.Redis, project: str | int, job_id: str) -> bool:
    """True when the project's pending marker names ``job_id``."""
    return (text(redis.get(keys.train_pending(project))) or "").startswith(job_id + " ")


# --- job state through rq's public API -------------------------------------------------------------

def _fetch(redis: redis_lib.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None


def _age_s(stamp: datetime | None) -> float | None:
    if stamp is None:
        return None
    if stamp.tzinfo is None:  # rq stores UTC without an offset
        stamp = stamp.replace(tzinfo=UTC)
    return (datetime.now(UTC) - stamp).total_seconds()


def _pending(redis: redis_lib.Redis, project: str) -> tuple[str | None, str | None, str, Job | None]:
    """(raw marker, job id, verdict, job) where verdict is live / stale / none."""
    raw = text(redis.get(keys.train_pending(project)))
    if not raw:
        return None, None, "none", None
    job_id, _, stamp = raw.partition(" ")
    job = _fetch(redis, job_id)
    if job is None:
        try:
            young = time.time() - float(stamp) < ENQUEUE_GRACE_S
        except ValueError:
            young = False
        return raw, job_id, "live" if young else "stale", None
    status = job.get_status(refresh=False)
    if status not in _LIVE:
        return raw, job_id, "stale", job
    if status == JobStatus.STARTED:
        age = _age_s(job.last_heartbeat or job.started_at)
        if age is not None and age > STALE_HEARTBEAT_S:
            return raw, job_id, "stale", job  # its worker died; RQ will call it abandoned later
    return raw, job_id, "live", job


# --- requests ------------------------------------------------------------------------------------

def request_training(
    redis: redis_lib.Redis,
    project: str | int,
    label_config: str | None = None,
    force: bool = False,
    settings=None,
) -> dict:
    """Queue a training of ``project`` unless one is already queued (then coalesce into it).

    Returns ``{"status": "queued" | "coalesced", "job_id", "project", "queue"}``, or ``"refused"`` (no job)
    for a project marked deleted.
    """
    settings = settings if settings is not None else get_settings()
    project = keys.project_key(project)
    pkey = keys.train_pending(project)
    if redis.exists(keys.project_deleted(project)):  # PROJECT_DELETED seen: see backend.core.lifecycle
        return {"status": "refused", "reason": "project deleted in Label Studio", "job_id": None, "project": project,
                "queue": queue_name()}
    for _attempt in range(5):
        raw, job_id, verdict, _job = _pending(redis, project)
        if verdict == "live":
            if force:
                redis.set(keys.train_force(project), "1", ex=PENDING_TTL_S)
            return {"status": "coalesced", "job_id": job_id, "project": project, "queue": queue_name()}
        if verdict == "stale":
            delete_if_equal(redis, pkey, raw)
        job_id = f"train-{project}-{uuid.uuid4().hex[:12]}"
        if not redis.set(pkey, pending_marker(job_id), nx=True, ex=PENDING_TTL_S):
            continue  # another request won the race: look again
        try:
            _enqueue(redis, project, job_id, label_config, force, settings)
        except BaseException:
            delete_if_prefixed(redis, pkey, job_id + " ")
            raise
        log.info("training of project %s queued as %s (force=%s)", project, job_id, force)
        return {"status": "queued", "job_id": job_id, "project": project, "queue": queue_name()}
    raise RuntimeError(f"could not queue a training for project {project}: pending marker kept changing")


def _enqueue(redis, project: str, job_id: str, label_config: str | None, force: bool, settings) -> None:
    queue = Queue(queue_name(), connection=redis)
    queue.enqueue(
        TRAIN_FUNC,
        project,
        label_config,
        force,
        job_id=job_id,
        job_timeout=int(settings.train_job_timeout),
        result_ttl=RESULT_TTL_S,
        failure_ttl=RESULT_TTL_S,
        retry=Retry(max=len(retry_intervals()), interval=retry_intervals()),
        description=f"train project {project}" + (" (forced)" if force else ""),
        meta={"project": project, "force": force, "kind": "training"},
    )


def record_annotation_event(redis: redis_lib.Redis, project: str | int, settings=None) -> dict:
    """Count one annotation change; request a training when the count reaches
    ``TRAIN_MIN_NEW_ANNOTATIONS`` (START_TRAINING should call :func:`request_training` with force).

    When the counter is missing but the project has a model on disk, Redis lost the count (and any
    queued training with it): a training is requested at once, not forced, so the job re-reads Label
    Studio and trains only if the annotations differ from the served model's dataset.
    """
    settings = settings if settings is not None else get_settings()
    project = keys.project_key(project)
    existed, count = (int(v) for v in redis.eval(_COUNT_EVENT, 1, keys.train_events(project)))
    threshold = int(settings.train_min_new_annotations)
    lost = not existed and ModelRegistry(settings.model_dir, None).current_version(project) is not None
    out: dict[str, Any] = {"project": project, "events": count, "threshold": threshold, "requested": False,
                           "counter_lost": lost}
    if count >= threshold or lost:
        out["requested"] = True
        out["training"] = request_training(redis, project, settings=settings)
    return out


def record_labels_deleted(redis: redis_lib.Redis, project: str | int, count: int = 1, settings=None) -> dict:
    """ANNOTATIONS_DELETED: count the deletions as changes and request a forced training now.

    The served model was trained on labels that are gone, so the retraining does not wait for
    ``TRAIN_MIN_NEW_ANNOTATIONS``; force skips the "nothing changed" shortcut and the gate then scores
    candidate and served model on the current labels only. The served model stays until a retrained
    one is promoted; ``/train/status`` shows ``labels_deleted_since_training`` meanwhile.
    """
    settings = settings if settings is not None else get_settings()
    project = keys.project_key(project)
    pipe = redis.pipeline(transaction=True)
    pipe.incrby(keys.train_events(project), max(int(count), 1))
    pipe.set(keys.labels_deleted(project), f"{time.time():.3f}")
    events, _ = pipe.execute()
    training = request_training(redis, project, force=True, settings=settings)
    return {"project": project, "events": int(events), "deleted": int(count), "requested": True, "training": training}


def _labels_deleted_since(deleted_raw: Any, last: dict | None) -> bool:
    """True while no training that started after the last deletion has passed the gate (promoted or rejected)."""
    try:
        deleted_at = float(text(deleted_raw) or "")
    except ValueError:
        return False
    if not last or last.get("status") not in ("promoted", "rejected"):
        return True
    try:
        return float(last.get("started_at") or 0) < deleted_at
    except (TypeError, ValueError):
        return True


# --- status --------------------------------------------------------------------------------------

def training_status(redis: redis_lib.Redis, project: str | int, settings=None) -> dict:
    """Queued / running / progress / last result / current version, in a few quick Redis calls."""
    project = keys.project_key(project)
    pipe = redis.pipeline(transaction=False)
    pipe.get(keys.train_pending(project))
    pipe.get(keys.train_running(project))
    pipe.get(keys.train_last(project))
    pipe.get(keys.train_events(project))
    pipe.get(keys.model_current(project))
    pipe.get(keys.labels_deleted(project))
    pipe.get(keys.project_deleted(project))
    pending_raw, running_raw, last_raw, events, current, deleted_raw, project_deleted_raw = pipe.execute()
    out: dict[str, Any] = {
        "project": project,
        "queued": None,
        "running": None,
        "progress": None,
        "last": json.loads(last_raw) if last_raw else None,
        "events_since_training": int(events or 0),
        "current_version": text(current),
        "labels_deleted_since_training": False,
        "project_deleted_at": None,
    }
    out["labels_deleted_since_training"] = _labels_deleted_since(deleted_raw, out["last"])
    if project_deleted_raw:
        out["project_deleted_at"] = float(text(project_deleted_raw).partition(" ")[0] or 0)
    if pending_raw:
        _raw, job_id, verdict, job = _pending(redis, project)
        if verdict == "live":
            status = job.get_status(refresh=False).value if job is not None else "missing"
            out["queued"] = {"job_id": job_id, "status": status}
    if running_raw:
        try:
            running = json.loads(running_raw)
        except ValueError:
            running = {}
        job_id = running.get("job_id")
        out["running"] = {k: running.get(k) for k in ("job_id", "host", "pid", "since")}
        if job_id and (job := _fetch(redis, job_id)) is not None:
            out["progress"] = (job.meta or {}).get("progress")
    if out["current_version"] is None and settings is not None:
        out["current_version"] = ModelRegistry(settings.model_dir, None).current_version(project)
    return out


# --- pre-labeling ---------------------------------------------------------------------------------
#
# Coalescing, like trainings: ``lsb:prelabel:<p>:queued`` maps each task id queued for drafting (and
# "*" for a whole-project run) to "<job id> <time>". A request drafts only the tasks no *live* job
# holds: queued, scheduled for a retry, or started with a heartbeat (a started job has its task list
# in its arguments, so it will draft them). A whole-project run covers later requests only while it is
# still queued (once started it may have listed the tasks already). Entries of finished, failed or
# missing jobs are stale and taken over; the hash expires PENDING_TTL_S after the last request and is
# pruned of stale entries when it grows past PRELABEL_PRUNE_AT fields.

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
        jobs[job_id] = _fetch(redis, job_id)
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
        age = _age_s(job.last_heartbeat or job.started_at)
        return age is None or age <= STALE_HEARTBEAT_S
    return status in _LIVE


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
