"""Training requests, coalescing and locking: light imports only (the web backend imports this).

Queues: ``training`` and ``prelabel`` (``LSB_QUEUE_PREFIX`` is prepended, e.g. for tests).
Start workers with the scheduler so retries with back-off run:
``rq worker --with-scheduler --url $REDIS_URL training prelabel``.

Redis keys (``<p>`` = project id)::

    lsb:train:<p>:pending   "<rq job id> <unix time>"  the queued training (at most one)
    lsb:train:<p>:running   JSON {job_id, token, host, pid, since}; PX = lock TTL, renewed by a heartbeat
    lsb:train:<p>:force     "1": a coalesced request asked for force=True
    lsb:train:<p>:events    annotation changes since the last training started
    lsb:train:<p>:last      JSON result of the last finished (or failed) training
    lsb:quality:<p>         JSON draft quality per source + the served model's val metrics (ROUTING=auto, /metrics)

Coalescing: :func:`request_training` enqueues a job only when no *live* pending job exists; the
pending marker is ignored (and replaced) when its RQ job is failed, stopped, canceled, finished or
missing, or "started" without a worker heartbeat for ``STALE_HEARTBEAT_S``; a marker younger than
``ENQUEUE_GRACE_S`` whose job is not visible yet counts as live (it is being enqueued). A training
job clears the marker only once it holds the project's running lock, so per project there is at
most one queued and one running training, and any request during a run schedules exactly one
follow-up.

Locking: the running lock is ``SET NX PX`` with a random token, renewed every TTL/3 by a heartbeat
thread; a SIGKILLed worker stops renewing and the lock expires after ``LSB_TRAIN_LOCK_TTL`` seconds
(default 30). A job that finds the lock held by another worker (another machine) **waits** for it,
polling, still marked pending (so further requests coalesce into it), up to its RQ timeout. If the
heartbeat ever fails to renew the lock, the job aborts before publishing anything.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import redis as redis_lib
from rq import Queue, Retry

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
LOCK_POLL_S = 1.0
_LIVE = {"queued", "scheduled", "deferred", "started", "created"}

_CAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
"""
_CAD_PREFIX = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end
"""


# --- names ---------------------------------------------------------------------------------------

def queue_name(kind: str = TRAINING_QUEUE) -> str:
    return os.environ.get("LSB_QUEUE_PREFIX", "") + kind


def retry_intervals() -> list[int]:
    raw = os.environ.get("LSB_TRAIN_RETRY_INTERVALS", "")
    values = [int(v) for v in raw.split(",") if v.strip()] if raw.strip() else list(RETRY_INTERVALS)
    return values or list(RETRY_INTERVALS)


def lock_ttl() -> float:
    return float(os.environ.get("LSB_TRAIN_LOCK_TTL", "30"))


def _pkey(project: str | int) -> str:
    from backend.core.registry import project_key  # light: json/os/redis only

    return project_key(project)


def key(project: str | int, name: str) -> str:
    return f"lsb:train:{_pkey(project)}:{name}"


def quality_key(project: str | int) -> str:
    return f"lsb:quality:{_pkey(project)}"


def make_redis(url: str, timeout: float = 1.0) -> redis_lib.Redis:
    """A client for the web path: short socket timeouts, bytes responses (RQ needs them)."""
    return redis_lib.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    health_check_interval=30)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _job_state(redis: redis_lib.Redis, job_id: str) -> tuple[str, dict]:
    """(status, hash fields) of an RQ job from its hash: ``missing`` when gone. One round trip."""
    fields = redis.hmget(f"rq:job:{job_id}", "status", "last_heartbeat", "started_at", "meta")
    status = _text(fields[0])
    if status is None:
        return "missing", {}
    return status, {"last_heartbeat": _text(fields[1]), "started_at": _text(fields[2]), "meta_raw": fields[3]}


def _age_s(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (datetime.now(UTC) - parsed).total_seconds()


def _pending(redis: redis_lib.Redis, project: str) -> tuple[str | None, str | None, str]:
    """(raw marker, job id, verdict) where verdict is live / stale / none."""
    raw = _text(redis.get(key(project, "pending")))
    if not raw:
        return None, None, "none"
    job_id, _, stamp = raw.partition(" ")
    status, fields = _job_state(redis, job_id)
    if status == "missing":
        try:
            young = time.time() - float(stamp) < ENQUEUE_GRACE_S
        except ValueError:
            young = False
        return raw, job_id, "live" if young else "stale"
    if status not in _LIVE:
        return raw, job_id, "stale"
    if status == "started":
        age = _age_s(fields.get("last_heartbeat") or fields.get("started_at"))
        if age is not None and age > STALE_HEARTBEAT_S:
            return raw, job_id, "stale"  # its worker died; RQ will call it abandoned later
    return raw, job_id, "live"


# --- requests ------------------------------------------------------------------------------------

def request_training(
    redis: redis_lib.Redis,
    project: str | int,
    label_config: str | None = None,
    force: bool = False,
    settings=None,
) -> dict:
    """Queue a training of ``project`` unless one is already queued (then coalesce into it).

    Returns ``{"status": "queued" | "coalesced", "job_id", "project", "queue"}``.
    """
    if settings is None:
        from backend.core.settings import get_settings

        settings = get_settings()
    project = _pkey(project)
    pkey = key(project, "pending")
    for _attempt in range(5):
        raw, job_id, verdict = _pending(redis, project)
        if verdict == "live":
            if force:
                redis.set(key(project, "force"), "1", ex=PENDING_TTL_S)
            return {"status": "coalesced", "job_id": job_id, "project": project, "queue": queue_name()}
        if verdict == "stale":
            redis.eval(_CAD, 1, pkey, raw)
        job_id = f"train-{project}-{uuid.uuid4().hex[:12]}"
        if not redis.set(pkey, f"{job_id} {time.time():.3f}", nx=True, ex=PENDING_TTL_S):
            continue  # another request won the race: look again
        try:
            _enqueue(redis, project, job_id, label_config, force, settings)
        except BaseException:
            redis.eval(_CAD_PREFIX, 1, pkey, job_id + " ")
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
    ``TRAIN_MIN_NEW_ANNOTATIONS`` (START_TRAINING should call :func:`request_training` with force)."""
    if settings is None:
        from backend.core.settings import get_settings

        settings = get_settings()
    project = _pkey(project)
    count = int(redis.incr(key(project, "events")))
    threshold = int(settings.train_min_new_annotations)
    out: dict[str, Any] = {"project": project, "events": count, "threshold": threshold, "requested": False}
    if count >= threshold:
        out["requested"] = True
        out["training"] = request_training(redis, project, settings=settings)
    return out


# --- status --------------------------------------------------------------------------------------

def _meta(redis, job_id: str) -> dict:
    """An RQ job's meta without importing its function (decoded with RQ's serializer)."""
    try:
        from rq.job import Job

        return Job.fetch(job_id, connection=redis).meta or {}
    except Exception:
        return {}


def training_status(redis: redis_lib.Redis, project: str | int, settings=None) -> dict:
    """Queued / running / progress / last result / current version, in a few quick Redis calls."""
    project = _pkey(project)
    pipe = redis.pipeline(transaction=False)
    pipe.get(key(project, "pending"))
    pipe.get(key(project, "running"))
    pipe.get(key(project, "last"))
    pipe.get(key(project, "events"))
    pipe.get(f"lsb:model:{project}:current")
    pending_raw, running_raw, last_raw, events, current = pipe.execute()
    out: dict[str, Any] = {
        "project": project,
        "queued": None,
        "running": None,
        "progress": None,
        "last": json.loads(last_raw) if last_raw else None,
        "events_since_training": int(events or 0),
        "current_version": _text(current),
    }
    if pending_raw:
        raw, job_id, verdict = _pending(redis, project)
        if verdict == "live":
            status, _ = _job_state(redis, job_id)
            out["queued"] = {"job_id": job_id, "status": status}
    if running_raw:
        try:
            running = json.loads(running_raw)
        except ValueError:
            running = {}
        job_id = running.get("job_id")
        out["running"] = {k: running.get(k) for k in ("job_id", "host", "pid", "since")}
        if job_id:
            out["progress"] = _meta(redis, job_id).get("progress")
    if out["current_version"] is None and settings is not None:
        from backend.core.registry import ModelRegistry

        out["current_version"] = ModelRegistry(settings.model_dir, None).current_version(project)
    return out


def draft_quality(redis: redis_lib.Redis, project: str | int) -> dict | None:
    """The stored draft quality of a project (see :func:`worker.jobs.training.train_project`)."""
    raw = redis.get(quality_key(project))
    return json.loads(raw) if raw else None


# --- the lock (worker side) ----------------------------------------------------------------------

class LockLost(RuntimeError):
    """The running lock expired or was taken while training: nothing may be published."""


class TrainingSlot:
    """The project's running lock held by one job, with its heartbeat thread."""

    def __init__(self, redis: redis_lib.Redis, project: str, job_id: str, ttl: float):
        self.redis = redis
        self.project = project
        self.job_id = job_id
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.value = json.dumps({"job_id": job_id, "token": self.token, "host": socket.gethostname(),
                                 "pid": os.getpid(), "since": time.time()})
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.force_requested = False
        self.events_consumed = 0
        self.waited_s = 0.0

    @property
    def key(self) -> str:
        return key(self.project, "running")

    def try_acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.value, nx=True, px=int(self.ttl * 1000)))

    def start_heartbeat(self) -> None:
        def beat() -> None:
            interval = max(self.ttl / 3.0, 0.2)
            while not self._stop.wait(interval):
                try:
                    if not self.redis.eval(_RENEW, 1, self.key, self.value, int(self.ttl * 1000)):
                        log.error("training lock of project %s lost", self.project)
                        self.lost.set()
                        return
                except redis_lib.RedisError as exc:  # keep trying until the TTL runs out
                    log.warning("could not renew the training lock: %s", exc)

        self._thread = threading.Thread(target=beat, name=f"train-lock-{self.project}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LockLost` unless we still hold the lock (call before publishing)."""
        if self.lost.is_set() or _text(self.redis.get(self.key)) != self.value:
            self.lost.set()
            raise LockLost(f"the training lock of project {self.project} expired or was taken; result discarded")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.redis.eval(_CAD, 1, self.key, self.value)
        except redis_lib.RedisError as exc:
            log.warning("could not release the training lock (it will expire): %s", exc)


@contextmanager
def training_slot(
    redis: redis_lib.Redis,
    project: str | int,
    job_id: str | None = None,
    timeout: float | None = None,
    on_wait=None,
) -> Iterator[TrainingSlot]:
    """Hold the project's running lock for the body (waiting for another worker's run to end).

    On entry, once the lock is held: the pending marker is cleared if it names this job, the
    event counter is reset (its old value in ``slot.events_consumed``) and a coalesced force flag
    is collected (``slot.force_requested``).
    """
    project = _pkey(project)
    job_id = job_id or f"local-{uuid.uuid4().hex[:12]}"
    slot = TrainingSlot(redis, project, job_id, lock_ttl())
    started = time.monotonic()
    deadline = started + (timeout if timeout is not None else 24 * 3600)
    while not slot.try_acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(f"project {project} has been training elsewhere for too long; giving up")
        if on_wait is not None:
            on_wait(_text(redis.get(slot.key)))
        time.sleep(LOCK_POLL_S)
    slot.waited_s = time.monotonic() - started
    try:
        slot.start_heartbeat()
        pipe = redis.pipeline(transaction=True)
        pipe.set(key(project, "events"), 0, get=True)
        pipe.getdel(key(project, "force"))
        events, force = pipe.execute()
        redis.eval(_CAD_PREFIX, 1, key(project, "pending"), job_id + " ")
        slot.events_consumed = int(events or 0)
        slot.force_requested = bool(force)
        yield slot
    finally:
        slot.release()


def requeue_marker(redis: redis_lib.Redis, project: str | int, job_id: str) -> bool:
    """Mark ``job_id`` (about to be retried by RQ) as the pending training, unless another is."""
    return bool(redis.set(key(project, "pending"), f"{job_id} {time.time():.3f}", nx=True, ex=PENDING_TTL_S))


# --- pre-labeling ---------------------------------------------------------------------------------

def enqueue_prelabel(redis: redis_lib.Redis, project: str, tasks: list[dict] | None = None,
                     label_config: str | None = None, settings: Any = None) -> str:
    """Queue a pre-labeling job; ``tasks=None`` means every task of the project lacking a current draft."""
    slim = None if tasks is None else [{"id": t.get("id"), "data": t.get("data") or {}} for t in tasks]
    job = Queue(queue_name(PRELABEL_QUEUE), connection=redis).enqueue(
        PRELABEL_FUNC, project, slim, label_config,
        job_timeout=max(600, 60 * (len(slim or []) // 50 + 1)),
        retry=Retry(max=3, interval=[10, 60, 300]),
        result_ttl=7 * 24 * 3600,
        failure_ttl=7 * 24 * 3600,
        description=f"pre-label project {project} ({'all' if slim is None else len(slim)} tasks)",
    )
    return job.id
