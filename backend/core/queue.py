"""The enqueue/status API the web uses: queue names, job state, training requests with coalescing, status.

Pre-labeling requests (per-task claims) are in :mod:`backend.core.prelabel_queue`.

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
from collections.abc import Callable
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
LIVE_STATUSES = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED, JobStatus.CREATED}

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

def fetch_job(redis: redis_lib.Redis, job_id: str) -> Job | None:
    """The RQ job, or None when Redis no longer holds it."""
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None


def age_s(stamp: datetime | None) -> float | None:
    """Seconds since an RQ timestamp (naive = UTC), None for no timestamp."""
    if stamp is None:
        return None
    if stamp.tzinfo is None:  # rq stores UTC without an offset
        stamp = stamp.replace(tzinfo=UTC)
    return (datetime.now(UTC) - stamp).total_seconds()


def marker_verdict(redis: redis_lib.Redis, raw: str, statuses=LIVE_STATUSES) -> tuple[str, str, Job | None]:
    """(job id, verdict, job) of a pending marker: ``live`` while its job is in ``statuses`` (or is still being
    enqueued, ENQUEUE_GRACE_S), else ``stale``; a started job whose heartbeat stopped is stale too."""
    job_id, _, stamp = raw.partition(" ")
    job = fetch_job(redis, job_id)
    if job is None:
        try:
            young = time.time() - float(stamp) < ENQUEUE_GRACE_S
        except ValueError:
            young = False
        return job_id, "live" if young else "stale", None
    status = job.get_status(refresh=False)
    if status not in statuses:
        return job_id, "stale", job
    if status == JobStatus.STARTED:
        age = age_s(job.last_heartbeat or job.started_at)
        if age is not None and age > STALE_HEARTBEAT_S:
            return job_id, "stale", job  # its worker died; RQ will call it abandoned later
    return job_id, "live", job


def _pending(redis: redis_lib.Redis, project: str) -> tuple[str | None, str | None, str, Job | None]:
    """(raw marker, job id, verdict, job) where verdict is live / stale / none."""
    raw = text(redis.get(keys.train_pending(project)))
    if not raw:
        return None, None, "none", None
    return raw, *marker_verdict(redis, raw)


def coalesce_or_enqueue(redis: redis_lib.Redis, pkey: str, job_prefix: str, enqueue: Callable[[str], None],
                        statuses=LIVE_STATUSES) -> tuple[str, str]:
    """("coalesced", its job id) while the job named by the pending marker ``pkey`` is live, else mark a new job
    ``<job_prefix>-<random>`` (SET NX, so one of racing requests wins) and ``enqueue(job_id)`` it: ("queued", id).

    The one coalescing request of trainings and re-scores; a failed enqueue removes its marker again.
    """
    for _attempt in range(5):
        raw = text(redis.get(pkey))
        if raw:
            job_id, verdict, _job = marker_verdict(redis, raw, statuses)
            if verdict == "live":
                return "coalesced", job_id
            delete_if_equal(redis, pkey, raw)
        job_id = f"{job_prefix}-{uuid.uuid4().hex[:12]}"
        if not redis.set(pkey, pending_marker(job_id), nx=True, ex=PENDING_TTL_S):
            continue  # another request won the race: look again
        try:
            enqueue(job_id)
        except BaseException:
            delete_if_prefixed(redis, pkey, job_id + " ")
            raise
        return "queued", job_id
    raise RuntimeError(f"could not queue {job_prefix}: pending marker {pkey} kept changing")


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
    if redis.exists(keys.project_deleted(project)):  # PROJECT_DELETED seen: see backend.core.lifecycle
        return {"status": "refused", "reason": "project deleted in Label Studio", "job_id": None, "project": project,
                "queue": queue_name()}
    status, job_id = coalesce_or_enqueue(redis, keys.train_pending(project), f"train-{project}",
                                         lambda job_id: _enqueue(redis, project, job_id, label_config, force, settings))
    if status == "coalesced":
        if force:
            redis.set(keys.train_force(project), "1", ex=PENDING_TTL_S)
    else:
        log.info("training of project %s queued as %s (force=%s)", project, job_id, force)
    return {"status": status, "job_id": job_id, "project": project, "queue": queue_name()}


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
    # The base the last training started from: pretrained weights, or the yaml fallback and why
    # (worker.training.base_model); null when it fine-tuned the current version or did not train.
    out["base_model"] = out["last"].get("base_model") if isinstance(out["last"], dict) else None
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
        if job_id and (job := fetch_job(redis, job_id)) is not None:
            out["progress"] = (job.meta or {}).get("progress")
    if out["current_version"] is None and settings is not None:
        out["current_version"] = ModelRegistry(settings.model_dir, None).current_version(project)
    return out
