"""The project's running lock: at most one training per project, across workers and machines.

The lock is ``lsb:train:<p>:running`` set with ``SET NX PX`` to a JSON value with a random token
(``/train/status`` shows its job, host and pid), renewed every TTL/3 by a heartbeat thread; a
SIGKILLed worker stops renewing and the lock expires after ``LSB_TRAIN_LOCK_TTL`` seconds (default
30). A job that finds the lock held by another worker **waits** for it, polling, still marked
pending (so further requests coalesce into it, see :mod:`backend.core.queue`), up to its RQ
timeout. If the heartbeat ever fails to renew the lock, :meth:`TrainingSlot.check` raises
:class:`LockLost` and the job aborts before publishing anything; :func:`worker.jobs.training.train_project`
then queues the training again (a Redis flush or restart drops the lock, the work is still wanted).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis as redis_lib

from backend.core import keys
from backend.core.queue import PENDING_TTL_S, delete_if_equal, delete_if_prefixed, pending_marker, pending_names, text

log = logging.getLogger(__name__)

LOCK_POLL_S = 1.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end
"""


def lock_ttl() -> float:
    return float(os.environ.get("LSB_TRAIN_LOCK_TTL", "30"))


class LockLost(RuntimeError):
    """The running lock expired or was taken while training: nothing may be published.

    ``force_requested``: a coalesced force flag the lost run had collected (the requeued run keeps it).
    """

    force_requested: bool = False


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
        return keys.train_running(self.project)

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
        if self.lost.is_set() or text(self.redis.get(self.key)) != self.value:
            self.lost.set()
            lost = LockLost(f"the training lock of project {self.project} expired or was taken; result discarded")
            lost.force_requested = self.force_requested
            raise lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            delete_if_equal(self.redis, self.key, self.value)
        except redis_lib.RedisError as exc:
            log.warning("could not release the training lock (it will expire): %s", exc)


@contextmanager
def training_slot(
    redis: redis_lib.Redis,
    project: str | int,
    job_id: str | None = None,
    timeout: float | None = None,
    on_wait: Callable[[str | None], None] | None = None,
) -> Iterator[TrainingSlot]:
    """Hold the project's running lock for the body (waiting for another worker's run to end).

    On entry, once the lock is held: the pending marker is cleared if it names this job, the
    event counter is reset (its old value in ``slot.events_consumed``) and a coalesced force flag
    is collected (``slot.force_requested``).
    """
    project = keys.project_key(project)
    job_id = job_id or f"local-{uuid.uuid4().hex[:12]}"
    slot = TrainingSlot(redis, project, job_id, lock_ttl())
    started = time.monotonic()
    deadline = started + (timeout if timeout is not None else 24 * 3600)
    while not slot.try_acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(f"project {project} has been training elsewhere for too long; giving up")
        if on_wait is not None:
            on_wait(text(redis.get(slot.key)))
        time.sleep(LOCK_POLL_S)
    slot.waited_s = time.monotonic() - started
    try:
        slot.start_heartbeat()
        pipe = redis.pipeline(transaction=True)
        pipe.set(keys.train_events(project), 0, get=True)
        pipe.getdel(keys.train_force(project))
        events, force = pipe.execute()
        delete_if_prefixed(redis, keys.train_pending(project), job_id + " ")
        slot.events_consumed = int(events or 0)
        slot.force_requested = bool(force)
        yield slot
    finally:
        slot.release()


def requeue_marker(redis: redis_lib.Redis, project: str | int, job_id: str) -> bool:
    """Keep ``job_id`` (about to be retried by RQ) as the project's pending training.

    True when the marker names this job afterwards; False when another training is already pending
    (that one will do the work).
    """
    marked = redis.set(keys.train_pending(project), pending_marker(job_id), nx=True, ex=PENDING_TTL_S)
    return bool(marked) or pending_names(redis, project, job_id)
