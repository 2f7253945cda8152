"""Label Studio webhook events: validate, enqueue, answer at once.

Label Studio waits one second and never retries, so this only touches Redis (with short
timeouts) and never trains or predicts inline. Training reads every annotation from the Label
Studio API, so a lost event delays training but loses no label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis as redis_lib

from backend.core import queue
from backend.core.keys import project_key
from backend.core.metrics import WEBHOOKS
from backend.core.settings import Settings

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}


class BadEvent(ValueError):
    """A payload that is not a Label Studio event; answered with 400 and this message."""


@dataclass
class EventResult:
    status: int
    body: dict[str, Any]


def _project_of(payload: dict) -> tuple[str, str | None]:
    project = payload.get("project")
    if isinstance(project, dict):
        pid, config = project.get("id"), project.get("label_config")
    else:
        pid, config = project, None
    if pid is None:
        raise BadEvent("event has no project id")
    try:
        return project_key(pid), config if isinstance(config, str) else None
    except ValueError as exc:
        raise BadEvent(str(exc)) from exc


def handle_event(payload: Any, redis: redis_lib.Redis, settings: Settings) -> EventResult:
    """Route one event to the queues; raises :class:`BadEvent` on malformed input."""
    if not isinstance(payload, dict):
        raise BadEvent("body must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise BadEvent("body has no 'action'")

    if action in ANNOTATION_EVENTS:
        annotation = payload.get("annotation") or {}
        if not isinstance(annotation, dict):
            raise BadEvent("'annotation' must be an object")
        project, _ = _project_of(payload)
        if annotation.get("was_cancelled"):
            WEBHOOKS.labels(action, "skipped_task").inc()
            return EventResult(200, {"status": "ignored", "reason": "skipped task"})
        result = queue.record_annotation_event(redis, project, settings)
        WEBHOOKS.labels(action, "counted").inc()
        return EventResult(200, {"status": "ok", **result})

    if action == "START_TRAINING":
        project, config = _project_of(payload)
        result = queue.request_training(redis, project, label_config=config, force=True)
        WEBHOOKS.labels(action, "queued").inc()
        return EventResult(201, {"status": "ok", **result})

    if action == "TASKS_CREATED":
        project, config = _project_of(payload)
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadEvent("'tasks' must be a list of task objects")
        job_id = queue.enqueue_prelabel(redis, project, tasks=tasks, label_config=config, settings=settings)
        WEBHOOKS.labels(action, "queued").inc()
        return EventResult(200, {"status": "ok", "prelabel_job": job_id, "tasks": len(tasks)})

    WEBHOOKS.labels("other", "ignored").inc()
    return EventResult(200, {"status": "ignored", "action": action})
