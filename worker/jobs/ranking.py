"""Re-score the drafts of a project's un-annotated tasks with the served YOLO: most useful tasks first.

Label Studio's Data Manager sorts by "Prediction score", the average ``score`` of a task's predictions
(docs/label-studio.md#sorting-by-prediction-score). After a promotion the model that would learn from
a correction changed, so this job (enqueued by :func:`backend.core.rank_queue.request_ranking` after
each promotion, and by ``lsb rank``) lists the tasks nobody annotated that hold drafts
(``DRAFTED_FILTER``: listing them never makes Label Studio call /predict), runs the current YOLO on
each image, one at a time (bounded memory; images through the SSRF-safe loader), and writes the task's
usefulness (:mod:`backend.serving.usefulness`, with the disagreement against a stored Gemini draft) to
every prediction of the task with ``PATCH /api/predictions/<id>/``: the drafts' regions are untouched.

A task whose image cannot be loaded or whose PATCH Label Studio refuses fails alone (counted, logged);
an unreachable Label Studio fails the job.
"""

from __future__ import annotations

import logging
import time

import httpx
from rq import get_current_job

from backend.control_models.reader import parse_regions
from backend.core import keys
from backend.core.connection import connect_patient
from backend.core.detections import Detections
from backend.core.images import ImageError, ImageLoader
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import (
    DraftedTask,
    client_from_settings,
    fetch_drafted_tasks,
    fetch_label_config,
    translate_error,
)
from backend.core.logs import configure_logging
from backend.core.progress import save_meta
from backend.core.rank_queue import ranking_started
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings, get_settings
from backend.detectors.yolo import YoloDetector
from backend.serving.predictor import task_image
from backend.serving.services import JobModels
from backend.serving.usefulness import FLOOR, usefulness

log = logging.getLogger(__name__)
#: Progress is saved to the job's meta every this many tasks.
PROGRESS_EVERY = 20


def gemini_draft(task: DraftedTask, config: ProjectConfig, size: tuple[int, int]) -> Detections | None:
    """The task's latest stored Gemini draft as detections, or None when Gemini never drafted it."""
    drafts = [p for p in task.predictions if p.source == "gemini"]
    if not drafts:
        return None
    latest = max(drafts, key=lambda p: (p.created_at, p.id or 0))
    parsed = parse_regions(latest.result, config, size)
    return parsed.detections(size[0], size[1], "gemini", latest.model_version)


def score_task(task: DraftedTask, yolo: YoloDetector, loader: ImageLoader, config: ProjectConfig, threshold: float) -> float:
    """The task's usefulness; raises :class:`ImageError` or ValueError for a task that cannot be scored."""
    url, problem = task_image({"id": task.id, "data": task.data}, config.image_key)
    if problem:
        raise ValueError(problem)
    loaded = loader.load(url, task.id)
    view = yolo.detect_batch([loaded.image], config, FLOOR)[0]
    return usefulness(view, threshold, gemini_draft(task, config, loaded.image.size))


def rank_tasks(project: str, settings: Settings, client, yolo: YoloDetector, config: ProjectConfig) -> dict:
    """Score every listed task and PATCH its predictions; returns counts (no task fails another)."""
    threshold = config.score_threshold(settings.yolo_score_threshold)
    started = time.monotonic()
    tasks = fetch_drafted_tasks(project, settings, client)
    scored = patched = failed = 0
    failures: dict[str, int] = {}
    scores: dict[int, float] = {}
    save_meta(total=len(tasks), done=0)
    with ImageLoader(settings) as loader:
        for n, task in enumerate(tasks, 1):
            try:
                score = score_task(task, yolo, loader, config, threshold)
                for prediction in task.predictions:
                    if prediction.id is not None and prediction.score != score:
                        client.predictions.update(id=prediction.id, score=score)
                        patched += 1
                scores[task.id] = score
                scored += 1
            except httpx.TransportError as exc:  # Label Studio went away: every later task would fail too
                raise translate_error(exc, settings.label_studio_url, f"re-score task {task.id}") from exc
            except Exception as exc:  # a bad image, a refused PATCH: this task only
                failed += 1
                kind = "image" if isinstance(exc, ImageError) else type(exc).__name__
                failures[kind] = failures.get(kind, 0) + 1
                log.warning("re-score of task %s failed: %s: %s", task.id, type(exc).__name__, exc)
            if n % PROGRESS_EVERY == 0:
                save_meta(total=len(tasks), done=n, scored=scored, failed=failed)
    result = {"project": project, "status": "ranked", "version": yolo.version, "tasks": len(tasks), "scored": scored,
              "patched": patched, "failed": failed, "failures": failures, "scores": scores,
              "seconds": round(time.monotonic() - started, 2)}
    log.info("re-scored project %s with %s: %d tasks, %d scored, %d predictions patched, %d failed",
             project, yolo.version, len(tasks), scored, patched, failed)
    return result


def run_ranking(project: str, settings: Settings, redis=None) -> dict:
    """Re-score ``project`` with its current YOLO version (``redis`` may be None: the registry's files suffice)."""
    project = keys.project_key(project)
    yolo = JobModels(settings, ModelRegistry(settings.model_dir, redis)).get(project)
    if yolo is None:
        log.info("project %s has no YOLO model: nothing to re-score with", project)
        return {"project": project, "status": "skipped", "reason": "no YOLO model for this project yet"}
    client = client_from_settings(settings)
    config = ProjectConfig.parse(fetch_label_config(client, project, settings.label_studio_url))
    return rank_tasks(project, settings, client, yolo, config)


def rank_project(project: str) -> dict:
    """RQ entry point (enqueued by :func:`backend.core.rank_queue.request_ranking`)."""
    settings = get_settings()
    configure_logging(settings)
    job = get_current_job()
    redis = job.connection if job is not None else connect_patient(settings.redis_url)
    project = keys.project_key(project)
    if job is not None:
        ranking_started(redis, project, job.id)
    try:
        return run_ranking(project, settings, redis)
    except Exception as exc:
        save_meta(error=f"{type(exc).__name__}: {exc}")
        log.error("re-score of project %s failed: %s", project, exc)
        raise
