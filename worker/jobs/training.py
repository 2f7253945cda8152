"""RQ job entry points: fetch -> dataset -> train -> gate -> registry, and draft quality.

``train_project`` is what :func:`backend.core.queue.request_training` enqueues. It runs inside the
project's running lock (see :mod:`worker.training.lock`), reads everything from Label Studio (webhooks
are lossy), builds the dataset (human annotations, plus the stored drafts of unannotated tasks when
``TRAIN_DRAFTS``: :mod:`worker.training.drafts`; drafts train only, never judge), fine-tunes the current
model (or trains from ``YOLO_BASE_MODEL``), evaluates candidate and current on the same held-out tasks
and promotes the candidate only when it wins (``PROMOTE_MIN_GAIN``). Only promoted candidates become
registry versions; a rejected candidate's metrics go to the job result, ``lsb:train:<p>:last`` and the
current version's meta (``last_challenger``), and its checkpoint is kept under
``DATA_DIR/candidates/<p>/`` (last 2).

Draft quality (stored predictions vs final labels on the held-out tasks, per source) goes to the
version meta (``draft_quality``) and to Redis ``lsb:quality:<p>`` for /metrics and ROUTING=auto::

    {"project": "3", "version": "v0004", "updated_at": 1795300000.0, "val_tasks": 12,
     "sources": {"gemini": {"precision", "recall", "map50", "n", "n_gt", "n_pred"}, "yolo": {...}},
     "model": {"version": "v0004", "map50", "map50_95", "precision", "recall"},
     "evaluation": {"per_class", "side_by_side", "confusion", "label_errors", ...}}  # worker.training.review

Races: the training promotes with a compare-and-swap on the version it started from; when a rollback
(or any other promotion) changed the current version meanwhile, the candidate stays an unpromoted
registry version (meta ``promotion``) and the result says ``"superseded"`` with the reason. When the
running lock is lost (it expired: Redis flushed or restarted, a long outage), the job publishes
nothing and queues the training again (``"requeued"``) instead of dropping it.

Failures: Label Studio unreachable -> :class:`~backend.core.label_studio.LabelStudioUnavailable`, retried by
RQ with back-off (``LSB_TRAIN_RETRY_INTERVALS``); every other error fails the job at once (no
retry) with its message in ``job.meta["error"]`` and in ``lsb:train:<p>:last``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis as redis_lib
from rq import get_current_job

from backend.core import keys
from backend.core.connection import connect_patient
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import LabelStudioUnavailable, client_from_settings, fetch_drafted_tasks, fetch_project
from backend.core.logs import configure_logging
from backend.core.progress import report_progress, save_meta
from backend.core.queue import request_training
from backend.core.rank_queue import rank_after_promotion
from backend.core.registry import ModelRegistry, PromotionConflict
from backend.core.settings import get_settings
from backend.serving.predictor import ServingState
from worker.training.dataset import NotEnoughData, build_dataset
from worker.training.drafts import DraftSelection, select_drafts
from worker.training.exporter import export_and_check, export_int8
from worker.training.gate import draft_quality, evaluate_gate, held_out_metrics
from worker.training.lock import LockLost, requeue_marker, training_slot
from worker.training.review import review_after_gate
from worker.training.trainer import resolve_device, train

log = logging.getLogger(__name__)

KEEP_REJECTED = 2


def _now() -> float:
    return round(time.time(), 3)


def _set_progress(job, **update: Any) -> None:
    if job is not None:  # run in-process (``lsb train --now``): nobody to report to
        report_progress(update, job)


#: Training results kept per project for the status page (rejected and failed ones included).
HISTORY_LENGTH = 50


def _store_last(redis, project: str, result: dict) -> None:
    try:
        payload = json.dumps(result, default=str)
        pipe = redis.pipeline(transaction=True)
        pipe.set(keys.train_last(project), payload)
        pipe.lpush(keys.train_history(project), payload)
        pipe.ltrim(keys.train_history(project), 0, HISTORY_LENGTH - 1)
        pipe.execute()
    except redis_lib.RedisError as exc:
        log.warning("could not store the training result in Redis: %s", exc)


def _store_quality(redis, project: str, payload: dict) -> None:
    try:
        redis.set(keys.quality(project), json.dumps(payload, default=str))
    except redis_lib.RedisError as exc:
        log.warning("could not store draft quality in Redis: %s", exc)


def _keep_rejected(settings, project: str, checkpoint: Path) -> Path:
    folder = Path(settings.data_dir).resolve() / "candidates" / project
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"rejected-{int(time.time() * 1000)}.pt"
    shutil.move(str(checkpoint), target)
    for old in sorted(folder.glob("rejected-*.pt"))[:-KEEP_REJECTED]:
        old.unlink(missing_ok=True)
    return target


def _verified_exports(settings, checkpoint: Path, dataset, config, imgsz: int,
                      reference: dict) -> tuple[dict[str, Path], dict[str, Any]]:
    """Faster CPU formats of the candidate and how each fared (for the version meta's ``export_checks``).

    f32 formats (EXPORT_FORMATS) are kept only if they give the .pt's boxes; the INT8 OpenVINO model
    (EXPORT_INT8) only if its held-out mAP50-95 is within EXPORT_INT8_MAX_DROP of the .pt's (``reference``,
    the gate's figures). Never raises: exports are an optimisation, a promotion must not fail for one.
    """
    out_dir = Path(checkpoint).parent / "exports"
    exports: dict[str, Path] = {}
    checks: dict[str, Any] = {}
    formats = [f.strip() for f in settings.export_formats.split(",") if f.strip()]
    if formats:
        samples = [item.image_path for item in (dataset.val_items or dataset.items)[:8]]
        try:
            report = export_and_check(checkpoint, out_dir, samples, imgsz, formats=formats)
            exports.update(report.passed)
            checks.update({fmt: asdict(check) for fmt, check in report.checks.items()})
        except Exception as exc:
            log.exception("exporting %s failed; the version will be served from its .pt", checkpoint)
            checks["error"] = f"{type(exc).__name__}: {exc}"[:500]
    if settings.export_int8 and reference.get("map50_95") is not None:
        check = export_int8(checkpoint, out_dir, dataset.data_yaml, imgsz,
                            lambda path: held_out_metrics(path, dataset, config, imgsz=imgsz)["map50_95"],
                            float(reference["map50_95"]), float(settings.export_int8_max_drop))
        checks[check.fmt] = asdict(check)
        if check.ok and check.path:
            exports[check.fmt] = Path(check.path)
    return exports, checks


def _served_model_version(settings, project: str, current_version: str | None) -> str:
    """The ``model_version`` /setup reports now (what annotators are shown): drafts of it are preferred."""
    gemini = settings.gemini_model if settings.gemini_enabled and settings.routing != "yolo" else None
    return ServingState(project, current_version, gemini).model_version


def _draft_selection(settings, project: str, client, current_version: str | None) -> DraftSelection | None:
    """The stored drafts of unannotated tasks this training may learn from (None when TRAIN_DRAFTS is off)."""
    if not settings.train_drafts:
        return None
    try:
        drafted = fetch_drafted_tasks(project, settings, client=client)
    except Exception as exc:  # noqa: BLE001 - drafts are an extra: the human annotations were just read, train on them
        log.warning("project %s: stored drafts could not be listed, training on human annotations only: %s: %s",
                    project, type(exc).__name__, exc)
        return None
    return select_drafts(drafted, _served_model_version(settings, project, current_version),
                         float(settings.train_draft_min_score))


def _metrics_summary(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: metrics.get(k) for k in ("map50", "map50_95", "precision", "recall", "n_images", "n_gt", "seconds")}


def run_training(
    project: str | int,
    label_config: str | None = None,
    force: bool = False,
    *,
    settings=None,
    redis: redis_lib.Redis | None = None,
    job=None,
    loader=None,
    client=None,
    train_overrides: dict | None = None,
) -> dict:
    """The whole training pipeline (in the caller's process; ``train_project`` is the RQ wrapper)."""
    settings = settings if settings is not None else get_settings()
    project = keys.project_key(project)
    redis = redis if redis is not None else connect_patient(settings.redis_url)
    registry = ModelRegistry(settings.model_dir, redis)
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 3)
        return now

    def waiting(holder: str | None) -> None:
        _set_progress(job, stage="waiting_for_lock", holder=holder)

    job_id = job.id if job is not None else None
    with training_slot(redis, project, job_id, timeout=float(settings.train_job_timeout), on_wait=waiting) as slot:
        t = time.monotonic()
        timings["wait_lock"] = round(slot.waited_s, 3)
        force = bool(force or slot.force_requested)
        base = {"project": project, "job_id": job_id, "force": force, "events_consumed": slot.events_consumed,
                "started_at": _now()}

        _set_progress(job, stage="fetching")
        client = client or client_from_settings(settings)  # one client (one token exchange) for both listings
        snapshot = fetch_project(project, settings, client=client, label_config=label_config)
        config = ProjectConfig.parse(snapshot.label_config)
        # The version this training starts from: it is fine-tuned, it is the gate's opponent, and the
        # candidate is promoted only if it is still current then (compare-and-swap: a rollback wins).
        current = registry.current(project)
        drafts = _draft_selection(settings, project, client, current.version if current else None)
        t = lap("fetch", t)

        _set_progress(job, stage="dataset", tasks=len(snapshot.tasks), drafts=len(drafts.drafts) if drafts else 0)
        try:
            dataset = build_dataset(project, snapshot.tasks, config, settings, loader=loader, drafts=drafts)
        except NotEnoughData as exc:
            result = {**base, "status": "skipped", "reason": str(exc), "promoted": False,
                      "version": current.version if current else None, "tasks": len(snapshot.tasks),
                      "durations": {**timings, "total": round(time.monotonic() - started, 3)}, "finished_at": _now()}
            _store_last(redis, project, result)
            return result
        t = lap("dataset", t)
        quality = draft_quality(snapshot.tasks, dataset.val_items, config)  # human-annotated held-out tasks only
        counts = {**dataset.counts, "tasks_listed": snapshot.tasks_seen, "tasks_skipped_only": snapshot.cancelled_only}

        if not force and current is not None and current.meta.get("dataset_hash") == dataset.dataset_hash:
            result = {**base, "status": "skipped", "reason": f"no annotation changed since {current.version}",
                      "promoted": False, "version": current.version, "dataset_hash": dataset.dataset_hash,
                      "counts": counts, "draft_quality": quality,
                      "durations": {**timings, "total": round(time.monotonic() - started, 3)}, "finished_at": _now()}
            _store_last(redis, project, result)
            return result

        slot.check()  # a lock lost while fetching (e.g. a Redis flush): requeue now, not after training
        _set_progress(job, stage="training", train=len(dataset.train_ids), val=len(dataset.val_ids))
        trained = train(dataset.data_yaml, settings, current_checkpoint=current.checkpoint if current else None,
                        **(train_overrides or {}))
        t = lap("train", t)

        _set_progress(job, stage="evaluating")
        decision = evaluate_gate(trained.checkpoint, current.checkpoint if current else None, dataset, config,
                                 float(settings.promote_min_gain), device=resolve_device(settings.train_device))
        t = lap("evaluate", t)

        # Exports take seconds: do them before the last lock check, never between it and publishing.
        exports, export_checks = {}, {}
        if decision.promote:
            _set_progress(job, stage="exporting")
            exports, export_checks = _verified_exports(settings, trained.checkpoint, dataset, config,
                                                       int(trained.train_args.get("imgsz", settings.train_imgsz)),
                                                       decision.candidate)
        slot.check()  # never publish after losing the lock to another worker
        candidate_metrics = decision.candidate
        current_metrics = decision.current
        meta = {
            "parent": current.version if current else None,
            "classes": config.class_names,
            "dataset_hash": dataset.dataset_hash,
            "dataset": {"counts": counts, "val_task_ids": dataset.val_ids, "train_tasks": len(dataset.train_ids)},
            "metrics": candidate_metrics,
            "parent_metrics": current_metrics,
            "gate": {"promote": decision.promote, "reason": decision.reason, "gain": decision.gain,
                     "min_gain": float(settings.promote_min_gain)},
            "train": trained.to_meta() | {"checkpoint": None},
            "imgsz": int(trained.train_args.get("imgsz", settings.train_imgsz)),
            "draft_quality": quality,
            "job_id": job_id,
            "export_checks": export_checks,
        }
        version = current.version if current else None
        rejected_path = None
        status = "promoted" if decision.promote else "rejected"
        reason = decision.reason
        candidate_version = None
        preload = None
        if decision.promote:
            info = registry.add_version(project, trained.checkpoint, meta, extra_files=exports)
            candidate_version = info.version
            Path(trained.checkpoint).unlink(missing_ok=True)
            shutil.rmtree(Path(trained.checkpoint).parent / "exports", ignore_errors=True)
            # Every serving process loads the candidate now, so the promotion below is only a pointer swap.
            _set_progress(job, stage="preloading", version=info.version)
            preload = registry.preload(project, info.version, float(settings.model_preload_timeout))
            slot.check()  # the wait may be long: never publish after losing the lock
            try:
                registry.promote(project, info.version, expected=version)
                version = info.version
                served_metrics = candidate_metrics
            except PromotionConflict as exc:  # kept as a registry version: `rollback --version` serves it
                status, reason, version = "superseded", str(exc), exc.actual
                registry.update_meta(project, info.version, promotion={"promoted": False, "reason": reason, "at": _now()})
                served_metrics = None
                log.warning("%s", reason)
        else:
            rejected_path = str(_keep_rejected(settings, project, Path(trained.checkpoint)))
            served_metrics = current_metrics
            if current is not None:
                challenger = {"metrics": _metrics_summary(candidate_metrics), "reason": decision.reason,
                              "dataset_hash": dataset.dataset_hash, "checkpoint": rejected_path, "at": _now()}
                registry.update_meta(project, current.version, last_challenger=challenger, draft_quality=quality,
                                     metrics_latest_val=current_metrics)
        pruned = registry.prune(project, int(settings.keep_versions))
        lap("publish", t)

        if status != "superseded":  # the draft quality of a model that does not serve would mislead ROUTING=auto
            _store_quality(redis, project, {
                "project": project, "version": version, "updated_at": _now(), "val_tasks": len(dataset.val_ids),
                "sources": quality,
                "model": {"version": version, **(_metrics_summary(served_metrics) or {})} if served_metrics else None,
                "evaluation": review_after_gate(decision, dataset, snapshot.tasks, config, settings, project, version),
            })
        result = {
            **base,
            "status": status,
            "promoted": status == "promoted",
            "version": version,
            "candidate_version": candidate_version,
            "parent": current.version if current else None,
            "reason": reason,
            "candidate_metrics": candidate_metrics,
            "current_metrics": current_metrics,
            "ultralytics_metrics": trained.final_metrics,
            "epochs_run": trained.epochs_run,
            "fine_tuned": trained.fine_tuned,
            "base_model": trained.base_model,  # what a first training started from (worker.training.base_model)
            "dataset_hash": dataset.dataset_hash,
            "counts": counts,
            "val_task_ids": dataset.val_ids,
            "draft_quality": quality,
            "rejected_checkpoint": rejected_path,
            "pruned": pruned,
            "preload": preload,
            "export_checks": export_checks,
            "durations": {**timings, "total": round(time.monotonic() - started, 3)},
            "finished_at": _now(),
        }
        _store_last(redis, project, result)
        result["ranking"] = rank_after_promotion(redis, project, settings) if status == "promoted" else None  # most useful first
        _set_progress(job, stage="done", status=result["status"], version=version)
        log.info("project %s: %s (%s)", project, result["status"], reason)
        return result


def train_project(project: str, label_config: str | None = None, force: bool = False) -> dict:
    """RQ entry point (enqueued by :func:`backend.core.queue.request_training`)."""
    settings = get_settings()
    configure_logging(settings)  # the rq work horse: formatted, redacted log lines
    job = get_current_job()
    redis = job.connection if job is not None else connect_patient(settings.redis_url)
    project = keys.project_key(project)
    try:
        return run_training(project, label_config, force, settings=settings, redis=redis, job=job)
    except LockLost as exc:
        return _requeue_after_lost_lock(job, redis, project, label_config, force, settings, exc)
    except LabelStudioUnavailable as exc:
        retrying = False
        if job is not None and job.retries_left:
            # RQ will retry this job later: keep it as the project's pending training so events
            # coalesce into it; if another training is already pending, that one does the work.
            if requeue_marker(redis, project, job.id):
                retrying = True
            else:
                job.retries_left = 0
        message = f"{exc} " + ("(will retry)" if retrying else "(not retried)")
        _fail(job, redis, project, message, retrying)
        raise
    except BaseException as exc:
        if job is not None:
            job.retries_left = 0  # only an unreachable Label Studio is worth retrying
        _fail(job, redis, project, f"{type(exc).__name__}: {exc}", False)
        raise


def _requeue_after_lost_lock(job, redis, project: str, label_config, force: bool, settings, exc: LockLost) -> dict:
    """The lock expired under us (a Redis flush or restart, a long outage): nothing was published, and the
    work is still wanted, so queue it again (coalesced into a pending training if there is one)."""
    force = bool(force or exc.force_requested)
    queued = request_training(redis, project, label_config, force=force, settings=settings)
    message = f"{exc}; requeued as {queued['job_id']} ({queued['status']})"
    log.warning("training of project %s: %s", project, message)
    result = {"project": project, "status": "requeued", "reason": message, "requeued": queued,
              "job_id": job.id if job is not None else None, "finished_at": _now()}
    if job is not None:
        save_meta(job, progress={"stage": "requeued", "reason": message, "at": _now()})
    _store_last(redis, project, result)
    return result


def _fail(job, redis, project: str, message: str, retrying: bool) -> None:
    log.error("training of project %s failed: %s", project, message)
    if job is not None:
        save_meta(job, error=message, progress={"stage": "failed", "error": message, "retrying": retrying, "at": _now()})
    _store_last(redis, project, {"project": project, "status": "failed", "error": message, "retrying": retrying,
                                 "job_id": job.id if job is not None else None, "finished_at": _now()})
