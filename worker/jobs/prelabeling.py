"""Pre-labeling: drafts for imported tasks, stored in Label Studio by us.

Label Studio 1.23 never calls ``/predict`` on import; it only sends ``TASKS_CREATED``. This job
predicts those tasks in batches with the same predictor as ``/predict`` and stores each draft with
``POST /api/predictions`` under the current ``model_version``, so Label Studio does not ask again.
It is idempotent (tasks that already hold a prediction of the current version are skipped), so a
retry after a worker restart stores nothing twice; failures are not stored, so a retry or a later
run drafts them again.

The web process enqueues it by its dotted path (:func:`backend.core.prelabel_queue.enqueue_prelabel`).
"""

from __future__ import annotations

import logging
import time

import httpx
from label_studio_sdk.core.api_error import ApiError

from backend.core import import_status
from backend.core.connection import connect_patient
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import client_from_settings, translate_error
from backend.core.logs import configure_logging
from backend.core.progress import save_meta
from backend.core.settings import Settings, get_settings
from backend.serving.predictor import Predictor
from backend.serving.services import build_predictor

log = logging.getLogger(__name__)
#: Seconds to wait before listing the project's tasks again while ids of the request are missing from it.
#: Label Studio 1.23 sends TASKS_CREATED inside the import's transaction (data_import/functions.py),
#: before it updates the project's counters and commits, so the ids may be invisible for a while on a
#: loaded host. 7 s in all was the old window; about 30 s now, then the ids count as foreign.
RELIST_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


def label_studio(settings: Settings):
    """The SDK client (PAT refresh handled by the SDK); clear errors when unset or unreachable."""
    return client_from_settings(settings)


def _existing_versions(ls, project: int) -> dict[int, set[str]]:
    """Model versions of the predictions each task holds (reads /api/predictions, which never triggers /predict)."""
    held: dict[int, set[str]] = {}
    for prediction in ls.predictions.list(project=project):
        held.setdefault(int(prediction.task), set()).add(prediction.model_version or "")
    return held


existing_versions = _existing_versions  # public name for the batch poll (worker.jobs.batch_drafting)


def all_tasks(ls, project: int) -> list[dict]:
    tasks = []
    for task in ls.tasks.list(project=project, fields="all"):
        data = task.data if isinstance(task.data, dict) else {}
        tasks.append({"id": task.id, "data": data})
    return tasks


def project_task_ids(ls, project: int) -> set[int]:
    """Ids of the project's tasks, from the task list (never ``GET /api/tasks/<id>``: it makes Label Studio call /predict)."""
    return {int(task.id) for task in ls.tasks.list(project=project)}


def _task_id(task: dict) -> int | None:
    try:
        return int(task["id"])
    except (KeyError, TypeError, ValueError):
        return None


def own_tasks(ls, project: int, tasks: list[dict]) -> tuple[list[dict], int]:
    """The ``tasks`` that belong to ``project`` in Label Studio, and how many did not.

    Task ids come from the request (a webhook payload, /predict's overflow, ``lsb push``); the API token can
    usually write to other projects too, so a draft is stored only on a task the project's own list holds.
    Label Studio may send TASKS_CREATED before its import commits (a re-import runs in one transaction),
    so missing ids are looked for again after each of ``RELIST_DELAYS``.
    """
    wanted = {_task_id(task) for task in tasks} - {None}
    ids = project_task_ids(ls, project)
    for delay in RELIST_DELAYS:
        if wanted <= ids:
            break
        time.sleep(delay)
        ids = project_task_ids(ls, project)
    own = [task for task in tasks if _task_id(task) in ids]
    if len(own) < len(tasks):
        missing = sorted(wanted - ids)
        log.warning("pre-labeling project %s: %d of %d tasks are not in the project after %.0f s; skipped: %s",
                    project, len(tasks) - len(own), len(tasks), sum(RELIST_DELAYS), missing[:20])
    return own, len(tasks) - len(own)


def prelabel_tasks(project: str, tasks: list[dict] | None = None, label_config: str | None = None) -> dict:
    """RQ job: draft and store predictions for ``tasks`` (or every task without a current draft).

    The job builds its own predictor (the current model of the project, loaded once; no hot-swap
    threads) and closes it when done.
    """
    settings = get_settings()
    configure_logging(settings)
    predictor = build_predictor(settings, connect_patient(settings.redis_url), bulk=True)  # GEMINI_BULK_TIER
    try:
        return _prelabel(settings, predictor, int(project), tasks, label_config)
    except Exception as exc:
        talking_to_ls = isinstance(exc, (httpx.TransportError, ApiError))
        error = translate_error(exc, settings.label_studio_url, "pre-label") if talking_to_ls else exc
        save_meta(error=f"{type(error).__name__}: {error}")
        log.error("pre-labeling project %s failed: %s", project, error)
        if error is exc:
            raise
        raise error from exc  # retried by RQ (Retry on the job) with back-off
    finally:
        predictor.close()


def _prelabel(settings: Settings, predictor: Predictor, pid: int, tasks: list[dict] | None, label_config: str | None) -> dict:
    ls = label_studio(settings)
    if label_config is None:
        label_config = ls.projects.get(pid).label_config
    config = ProjectConfig.parse(label_config)
    foreign = 0
    tally = import_status.JobTally(connect_patient(settings.redis_url), pid)  # the visible import status
    if tasks is None:
        tasks = all_tasks(ls, pid)
    else:
        requested = tasks
        tasks, foreign = own_tasks(ls, pid, tasks)
        tally.not_in_project(requested, tasks)

    held = _existing_versions(ls, pid)
    started = time.monotonic()
    batched = 0
    if settings.gemini_bulk_tier == "batch" and predictor.gemini is not None and len(tasks) > settings.gemini_batch_min_tasks:
        from worker.jobs import batch_drafting  # import cycle: batch_drafting reuses this module's helpers

        version = predictor.model_version(pid)
        todo = [t for t in tasks if version not in held.get(int(t["id"]), set())]
        before = len(todo)
        _, tasks = batch_drafting.submit(settings, predictor, connect_patient(settings.redis_url), pid, todo,
                                         ProjectConfig.parse(label_config), label_config)
        batched = before - len(tasks)  # drafted later by the batch's polls; the rest go on below
    stored = skipped = failed = 0
    reasons: dict[str, int] = {}
    min_batch_seconds = 60.0 * settings.prelabel_batch / settings.gemini_rpm if settings.gemini_rpm else 0.0
    save_meta(total=len(tasks), done=0, stored=0)
    for start in range(0, len(tasks), settings.prelabel_batch):
        batch_started = time.monotonic()
        version = predictor.model_version(pid)
        chunk = tasks[start:start + settings.prelabel_batch]
        batch = [t for t in chunk if version not in held.get(int(t["id"]), set())]
        skipped += len(chunk) - len(batch)
        drafted, lost = [t for t in chunk if t not in batch], []  # for the import status
        for task, (prediction, reason) in zip(batch, predictor.predict_detailed(batch, config, pid)):
            if reason:
                failed += 1
                lost.append(task)
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            ls.predictions.create(task=int(task["id"]), result=prediction["result"], score=prediction["score"],
                                  model_version=prediction["model_version"])
            held.setdefault(int(task["id"]), set()).add(prediction["model_version"])
            stored += 1
            drafted.append(task)
        tally.batch(drafted, lost)
        save_meta(total=len(tasks), done=min(start + settings.prelabel_batch, len(tasks)), stored=stored, failed=failed)
        wait = min_batch_seconds - (time.monotonic() - batch_started)
        if wait > 0 and start + settings.prelabel_batch < len(tasks):
            time.sleep(wait)  # stay under GEMINI_RPM for long imports
    result = {"project": str(pid), "tasks": len(tasks) + batched, "batched": batched,
              "stored": stored, "skipped": skipped, "failed": failed,
              "not_in_project": foreign, "failure_reasons": reasons, "seconds": round(time.monotonic() - started, 2)}
    log.info("pre-labeled project %s: %s", pid, result)
    return result
