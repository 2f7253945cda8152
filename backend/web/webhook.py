"""Label Studio webhook events: validate, dedupe, enqueue, answer at once.

Label Studio waits one second and never retries, so this only touches Redis (with short
timeouts) and never trains or predicts inline. Training reads every annotation from the Label
Studio API, so a lost event delays training but loses no label.

Shapes accepted (docs/label-studio.md#webhook-events): ``project`` as an object (1.23), an id (int or
string), or absent with the id in ``annotation.project``, ``task.project`` or ``tasks[0].project``;
``annotation`` and ``task`` may be missing or null (the event still counts); ``ANNOTATIONS_DELETED``
carries ids only; ``START_TRAINING`` only the project; ``TASKS_CREATED`` without ``tasks`` drafts every
task lacking a current draft. Which tasks of an import are drafted is ``PRELABEL_ON_IMPORT`` or the
project's label-config attribute (:mod:`backend.core.prelabel_policy`); the import is counted in
:mod:`backend.core.import_status`. An event that names no project at all (a webhook with "Send payload"
off) is answered 400 with that reason.

Duplicate deliveries (two webhooks to this URL, a proxy replaying) do the work once: each delivery's
identity (action + annotation id + ``updated_at``, the deleted or created ids, else the whole body) is
remembered for ``WEBHOOK_DEDUPE_TTL`` seconds with ``SET NX``. ``START_TRAINING`` is a user's click, not a
delivery: it is not deduped, and :func:`backend.core.queue.request_training` coalesces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis as redis_lib

from backend.core import import_status, lifecycle, prelabel_policy, prelabel_queue, queue
from backend.core.keys import project_key, webhook_seen
from backend.core.metrics import WEBHOOKS
from backend.core.settings import Settings

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"}
NOT_DEDUPED = {"START_TRAINING"}


class BadEvent(ValueError):
    """A payload that is not a Label Studio event; answered with 400 and this message."""


@dataclass
class EventResult:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class ProjectRef:
    id: str
    label_config: str | None
    created_at: float | None  # when Label Studio created it (the project object's created_at)


def _object(payload: dict, name: str) -> dict:
    value = payload.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadEvent(f"'{name}' must be an object")
    return value


def _created_at(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _project_of(payload: dict) -> ProjectRef:
    """The project from wherever this Label Studio version put it."""
    project = payload.get("project")
    config = created = None
    if isinstance(project, dict):
        pid, config, created = project.get("id"), project.get("label_config"), _created_at(project.get("created_at"))
    else:
        pid = project
    if pid is None:
        tasks = payload.get("tasks")
        nested = [payload.get("annotation"), payload.get("task"), *(tasks[:1] if isinstance(tasks, list) else [])]
        pid = next((item.get("project") for item in nested if isinstance(item, dict) and item.get("project") is not None),
                   None)
        if isinstance(pid, dict):
            pid = pid.get("id")
    if pid is None:
        raise BadEvent("event has no project id (is 'Send payload' on for this webhook?)")
    try:
        return ProjectRef(project_key(pid), config if isinstance(config, str) else None, created)
    except ValueError as exc:
        raise BadEvent(str(exc)) from exc


def _ids(items: Any) -> list[str]:
    """Ids from ``[{"id": 5}, ...]`` or ``[5, ...]``, sorted (the identity of a bulk event)."""
    if not isinstance(items, list):
        return []
    raw = [item.get("id") if isinstance(item, dict) else item for item in items]
    return sorted(str(i) for i in raw if isinstance(i, int | str) and not isinstance(i, bool))


def delivery_identity(action: str, payload: dict) -> str:
    """What makes two deliveries the same event (see the module docstring)."""
    annotation = payload.get("annotation")
    if action in ANNOTATION_EVENTS and isinstance(annotation, dict) and annotation.get("id") is not None:
        return f"{action}:{annotation.get('id')}:{annotation.get('updated_at')}:{annotation.get('was_cancelled')}"
    bulk = _ids(payload.get("annotations")) or _ids(payload.get("tasks"))
    if bulk:
        return f"{action}:" + ",".join(bulk)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return f"{action}:body:{hashlib.sha256(body.encode()).hexdigest()}"


def _first_delivery(redis: redis_lib.Redis, project: str, action: str, payload: dict, settings: Settings) -> str | None:
    """The dedupe key when this is the first delivery (the caller releases it on failure); None for a duplicate."""
    ttl = int(settings.webhook_dedupe_ttl)
    if ttl <= 0 or action in NOT_DEDUPED:
        return ""
    digest = hashlib.sha256(delivery_identity(action, payload).encode()).hexdigest()
    key = webhook_seen(project, digest)
    return key if redis.set(key, "1", nx=True, ex=ttl) else None


def handle_event(payload: Any, redis: redis_lib.Redis, settings: Settings) -> EventResult:
    """Route one event to the queues; raises :class:`BadEvent` on malformed input."""
    if not isinstance(payload, dict):
        raise BadEvent("body must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise BadEvent("body has no 'action'")
    known = action in ANNOTATION_EVENTS or action in {"ANNOTATIONS_DELETED", "START_TRAINING", "TASKS_CREATED",
                                                      "PROJECT_DELETED", "PROJECT_CREATED"}
    if not known:
        WEBHOOKS.labels("other", "ignored").inc()
        return EventResult(200, {"status": "ignored", "action": action})
    annotation = _object(payload, "annotation")
    _object(payload, "task")
    tasks = payload.get("tasks")
    if action == "TASKS_CREATED" and tasks is not None and (
            not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks)):
        raise BadEvent("'tasks' must be a list of task objects")
    project = _project_of(payload)

    if action != "PROJECT_DELETED" and (gone := lifecycle.deletion(redis, project.id)) is not None:
        if action == "PROJECT_CREATED" or (project.created_at is not None and project.created_at > gone.at):
            # a new project under the same id (Label Studio sends events only for projects that exist)
            lifecycle.cancel_deletion(redis, project.id, f"{action} for a project created after the deletion")
        else:
            WEBHOOKS.labels(action, "project_deleted").inc()
            return EventResult(200, {"status": "ignored", "reason": "project deleted", "project": project.id})
    if action == "PROJECT_CREATED":
        WEBHOOKS.labels(action, "ignored").inc()
        return EventResult(200, {"status": "ignored", "action": action})

    seen_key = _first_delivery(redis, project.id, action, payload, settings)
    if seen_key is None:
        WEBHOOKS.labels(action, "duplicate").inc()
        return EventResult(200, {"status": "duplicate", "project": project.id})
    try:
        return _route(action, payload, annotation, project, redis, settings)
    except BaseException:
        if seen_key:  # nothing was done: a redelivery must not be taken for a duplicate
            redis.delete(seen_key)
        raise


def _route(action: str, payload: dict, annotation: dict, project: ProjectRef, redis: redis_lib.Redis,
           settings: Settings) -> EventResult:
    if action in ANNOTATION_EVENTS:
        if annotation.get("was_cancelled"):
            WEBHOOKS.labels(action, "skipped_task").inc()
            return EventResult(200, {"status": "ignored", "reason": "skipped task"})
        result = queue.record_annotation_event(redis, project.id, settings)
        WEBHOOKS.labels(action, "counted").inc()
        return EventResult(200, {"status": "ok", **result})

    if action == "ANNOTATIONS_DELETED":
        deleted = len(_ids(payload.get("annotations"))) or 1
        result = queue.record_labels_deleted(redis, project.id, deleted, settings)
        WEBHOOKS.labels(action, "retrain").inc()
        return EventResult(200, {"status": "ok", **result})

    if action == "START_TRAINING":
        result = queue.request_training(redis, project.id, label_config=project.label_config, force=True, settings=settings)
        WEBHOOKS.labels(action, "queued").inc()
        return EventResult(201, {"status": "ok", **result})

    if action == "TASKS_CREATED":
        tasks = payload.get("tasks")
        # which tasks to draft now: PRELABEL_ON_IMPORT or the project's label-config attribute
        decision = prelabel_policy.decide_import(redis, project.id, tasks, project.label_config, settings.prelabel_on_import,
                                                 settings.ls_webhook_batch_size, settings.prelabel_import_window_s)
        import_status.record_import(redis, project.id, tasks, decision)  # before the job exists: it counts from there
        result = {"status": "skipped_policy", "job_id": None, "project": project.id, "tasks": 0, "coalesced": 0}
        if decision.chosen != []:
            result = prelabel_queue.request_prelabel(redis, project.id, tasks=decision.chosen,
                                                     label_config=project.label_config, settings=settings)
        WEBHOOKS.labels(action, result["status"]).inc()
        return EventResult(200, {"status": "ok", "prelabel_job": result["job_id"],
                                 "tasks": len(tasks) if tasks is not None else "all", "prelabel": result,
                                 "policy": decision.summary()})

    result = lifecycle.mark_project_deleted(redis, project.id, settings)  # PROJECT_DELETED
    WEBHOOKS.labels(action, result["status"]).inc()
    return EventResult(200, {"status": "ok", **result})
