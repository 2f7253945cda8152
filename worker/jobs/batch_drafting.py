"""Bulk drafting through Gemini's Batch API: submit, poll with back-off, store each task's draft once.

The pre-labeling job (:mod:`worker.jobs.prelabeling`) hands its tasks here when ``GEMINI_BULK_TIER=batch``
and there are more than ``GEMINI_BATCH_MIN_TASKS``. :func:`submit` loads the images with the serving
loader (URL policy, SSRF guard), builds ``GEMINI_BATCH_CHUNK`` requests at a time (bounded memory),
submits each chunk as one batch (charged against the budget at once) and keeps everything a poll needs
in Redis (``lsb:gbatch:*``, backend/core/keys.py); :func:`poll_batch` then runs as scheduled RQ jobs
(backend/core/batch_queue.py), so a batch survives worker restarts.

Exactly once: a poll holds the batch's lock, skips tasks already marked done and tasks whose Label
Studio predictions already hold the current version (a poll killed between the POST and the mark),
and marks each task done (``HSETNX``) after storing it. Per-request failures, and every task of a batch
that ended FAILED, CANCELLED or EXPIRED, go through the synchronous path (flex, then standard, then
YOLO); what still fails is counted as failed in the result and the log. The reservation is settled once
(``HSETNX settled_usd``) to the billed cost of all the batch's results, whichever poll gets there.

A poll killed mid-run (SIGKILL with its worker) is resumed by :func:`sweep_batches`, a scheduled job that
runs every ``GEMINI_BATCH_SWEEP_S`` while a batch is live (backend/core/batch_queue.py: it breaks the dead
poll's lock and schedules a new poll, which replaces the dead one as the batch's only poll chain). The
import status (backend/core/import_status.py) shows the batch's tasks as ``batched`` and its reservation
until they are drafted or failed and the batch is settled.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import redis as redis_lib
from rq import get_current_job

from backend.core import import_status, keys
from backend.core.batch_queue import (
    LOCK_S,
    break_dead_lock,
    ensure_sweep,
    lock_value,
    poll_delay,
    release_sweep,
    schedule_poll,
    sweep,
)
from backend.core.connection import connect_patient
from backend.core.images import ImageError
from backend.core.label_config import ProjectConfig
from backend.core.logs import configure_logging
from backend.core.queue import text
from backend.core.settings import Settings, get_settings
from backend.detectors.gemini.batch import GeminiBatches
from backend.detectors.gemini.errors import GeminiUnavailable
from backend.serving.predictor import Predictor, task_image
from backend.serving.services import build_predictor
from worker.jobs.prelabeling import existing_versions, label_studio

log = logging.getLogger(__name__)
STATE_TTL_S = 3 * 24 * 3600  # longer than a batch can live at Google (about 48 h)


def submit(settings: Settings, predictor: Predictor, redis: redis_lib.Redis, pid: int, tasks: list[dict],
           config: ProjectConfig, label_config: str) -> tuple[list[str], list[dict]]:
    """Submit ``tasks`` as batches; returns (batch ids, the tasks left for the synchronous path)."""
    batches = GeminiBatches(predictor.gemini)  # type: ignore[arg-type]
    loader = predictor.router.loader
    ids: list[str] = []
    leftover: list[dict] = []
    size = settings.gemini_batch_chunk
    for start in range(0, len(tasks), size):
        requests, held = [], {}
        for task in tasks[start:start + size]:
            url, problem = task_image(task, config.image_key)
            try:
                image = None if problem else loader.load(url, task.get("id"))
            except ImageError:
                image = None
            if image is None:
                leftover.append(task)  # the synchronous path reports why
                continue
            requests.append(batches.request(str(task["id"]), image.image, image.sha256, config))
            held[str(task["id"])] = json.dumps({"id": task["id"], "data": task.get("data") or {},
                                                "size": [image.width, image.height]})
        if not requests:
            continue
        try:
            name, reserved = batches.submit(requests, f"lsb project {pid}")
        except GeminiUnavailable as exc:
            log.warning("gemini batch of project %s not submitted (%s): %d tasks go the synchronous way", pid, exc, len(held))
            leftover.extend(json.loads(v) for v in held.values())
            continue
        del requests
        batch = uuid.uuid4().hex[:12]
        pipe = redis.pipeline()
        pipe.hset(keys.gbatch(pid, batch), mapping={"name": name, "label_config": label_config, "reserved_usd": repr(reserved),
                                                    "submitted_at": repr(time.time()), "status": "running", "tasks": len(held)})
        pipe.hset(keys.gbatch_tasks(pid, batch), mapping=held)
        for key in (keys.gbatch(pid, batch), keys.gbatch_tasks(pid, batch)):
            pipe.expire(key, STATE_TTL_S)
        pipe.sadd(keys.gbatch_live(), f"{pid}:{batch}")
        pipe.execute()
        schedule_poll(redis, pid, batch, 0, settings.gemini_batch_poll_initial_s)
        _count(import_status.batch_submitted, redis, pid, list(held), reserved)
        ids.append(batch)
    if ids:
        ensure_sweep(redis, settings.gemini_batch_sweep_s)
    return ids, leftover


def _reconcile(redis: redis_lib.Redis, pid: int, done_key: str) -> None:
    """Every task the batch is done with, in the import status (a poll killed before counting them included)."""
    done = {text(k): text(v) or "" for k, v in redis.hgetall(done_key).items()}
    import_status.mark(redis, pid, [t for t, v in done.items() if v == "stored"], "drafted")
    import_status.mark(redis, pid, [t for t, v in done.items() if v.startswith("failed")], "failed")


def _count(write, *args) -> None:
    """Import-status bookkeeping never fails a batch: a Redis error is logged, the drafts stay stored."""
    try:
        write(*args)
    except redis_lib.RedisError as exc:
        log.warning("gemini batch: could not update the import status: %s", exc)


def poll_batch(project: str, batch: str, attempt: int = 0) -> dict:
    """RQ job: poll one batch; store its results, or schedule the next poll with back-off."""
    settings = get_settings()
    configure_logging(settings)
    redis = connect_patient(settings.redis_url)
    state = {text(k): text(v) for k, v in redis.hgetall(keys.gbatch(project, batch)).items()}
    if state.get("status") != "running":
        return {"batch": batch, "status": state.get("status", "gone")}
    job = get_current_job()
    me = job.id if job is not None else state.get("poll_job")
    if job is not None and state.get("poll_job") not in (None, job.id):
        # an RQ retry of a poll the sweep replaced: the batch has its own poll chain again
        return {"batch": batch, "status": "superseded", "current": state.get("poll_job")}
    ensure_sweep(redis, settings.gemini_batch_sweep_s)
    lock = keys.gbatch_lock(project, batch)
    value = lock_value(job.id if job is not None else None, job.worker_name if job is not None else None)
    acquired = redis.set(lock, value, nx=True, ex=LOCK_S)
    if not acquired and break_dead_lock(redis, project, batch):  # its holder died mid-poll
        acquired = redis.set(lock, value, nx=True, ex=LOCK_S)
    if not acquired:  # another poll of this batch runs (a CLI run, or one we cannot prove dead yet)
        schedule_poll(redis, project, batch, attempt + 1, settings.gemini_batch_poll_max_s, expect=me or "")
        return {"batch": batch, "status": "locked"}
    predictor = build_predictor(settings, redis, bulk=True)
    try:
        return _poll(settings, redis, predictor, int(project), batch, attempt, state, me or "")
    finally:
        predictor.close()
        if text(redis.get(lock)) == value:
            redis.delete(lock)


def sweep_batches() -> dict:
    """RQ job: resume live batches whose poll died (backend/core/batch_queue.py), then schedule the next sweep
    while any batch is live."""
    settings = get_settings()
    configure_logging(settings)
    redis = connect_patient(settings.redis_url)
    job = get_current_job()
    if job is not None:
        release_sweep(redis, job.id)
    counts = sweep(redis)
    if counts["live"]:
        ensure_sweep(redis, settings.gemini_batch_sweep_s)
    if counts["resumed"] or counts["locks_broken"] or counts["forgotten"]:
        log.info("gemini batches swept: %s", counts)
    return counts


def _poll(settings: Settings, redis: redis_lib.Redis, predictor: Predictor, pid: int, batch: str, attempt: int,
          state: dict[str, str], me: str) -> dict:
    batches = GeminiBatches(predictor.gemini)  # type: ignore[arg-type]
    try:
        poll = batches.poll(state["name"])
        running = poll.running
    except GeminiUnavailable as exc:
        if exc.reason == "client_error" and "404" in exc.message:
            poll, running = None, False  # deleted at Google: the tasks go the synchronous way
        else:
            log.warning("gemini batch %s: poll failed (%s), polled again later", state["name"], exc)
            poll, running = None, True
    if running:
        delay = poll_delay(attempt + 1, settings.gemini_batch_poll_initial_s, settings.gemini_batch_poll_max_s)
        if schedule_poll(redis, pid, batch, attempt + 1, delay, expect=me) is None:
            return {"batch": batch, "status": "superseded"}
        return {"batch": batch, "status": "running", "next_poll_s": delay}

    ls = label_studio(settings)
    config = ProjectConfig.parse(state["label_config"])
    pending = {text(k): json.loads(v) for k, v in redis.hgetall(keys.gbatch_tasks(pid, batch)).items()}
    held = existing_versions(ls, pid)
    version = predictor.model_version(pid)
    done_key = keys.gbatch_done(pid, batch)
    counts = {"stored": 0, "failed": 0, "retried": 0}
    retry: list[dict] = []

    def store(task: dict, prediction: dict) -> None:
        tid = str(task["id"])
        if redis.hexists(done_key, tid):
            return
        if prediction["model_version"] not in held.get(int(tid), set()):
            ls.predictions.create(task=int(tid), result=prediction["result"], score=prediction["score"],
                                  model_version=prediction["model_version"])
            counts["stored"] += 1
        redis.hsetnx(done_key, tid, "stored")
        redis.expire(done_key, STATE_TTL_S)
        redis.hdel(keys.gbatch_tasks(pid, batch), tid)
        _count(import_status.mark, redis, pid, [tid], "drafted")

    results = {r.key: r for r in (poll.results or [])} if poll is not None else {}
    actual = sum(r.cost_usd for r in results.values())  # every result is billed, whichever poll stores it
    for tid, task in pending.items():
        if redis.hexists(done_key, tid):
            continue
        if version in held.get(int(tid), set()):
            store(task, {"model_version": version})  # stored by a poll killed before its mark: only mark it
            continue
        result = results.get(tid)
        if result is None or result.answer is None:
            retry.append(task)
            continue
        try:
            detections = batches.detections(result.answer, tuple(task["size"]), config)
        except GeminiUnavailable:
            retry.append(task)
            continue
        store(task, predictor.draft(int(tid), config, pid, detections))
    tally = import_status.JobTally(redis, pid)  # from here on: the synchronous retries' own spend
    failed: list[str] = []
    for task, (prediction, reason) in zip(retry, predictor.predict_detailed(
            [{"id": t["id"], "data": t["data"]} for t in retry], config, pid)):
        counts["retried"] += 1
        if reason:
            counts["failed"] += 1
            redis.hsetnx(done_key, str(task["id"]), f"failed {reason.split(':')[0]}")
            failed.append(str(task["id"]))
            continue
        store(task, prediction)
    tally.batch([], failed)
    reserved = float(state.get("reserved_usd") or 0.0)
    if redis.hsetnx(keys.gbatch(pid, batch), "settled_usd", repr(actual)):
        predictor.gemini.cost.settle(reserved, actual)  # type: ignore[union-attr]
        _count(import_status.batch_settled, redis, pid, reserved, actual)
    # the batch's totals over every poll that worked on it (a killed one included): its done hash
    done = [text(v) or "" for v in redis.hvals(done_key)]
    _count(_reconcile, redis, pid, done_key)
    outcome = "succeeded" if poll is not None and poll.results is not None else (poll.state if poll else "gone")
    redis.hincrby(keys.gbatch(pid, batch), "retried", counts["retried"])
    redis.hset(keys.gbatch(pid, batch), mapping={"status": "finished", "outcome": outcome,
                                                 "stored": sum(v == "stored" for v in done),
                                                 "failed": sum(v.startswith("failed") for v in done)})
    redis.srem(keys.gbatch_live(), f"{pid}:{batch}")
    result = {"batch": batch, "status": "finished", "outcome": outcome, "tasks": len(pending), "spent_usd": round(actual, 6),
              **counts}
    log.info("gemini batch %s of project %s: %s", state["name"], pid, result)
    return result
