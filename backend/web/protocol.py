"""Label Studio's ML backend protocol: ``/health``, ``/setup``, ``/predict``, ``/webhook``, ``/versions``.

Path of a prediction: ``/predict`` (here) -> :class:`backend.serving.predictor.Predictor` ->
:class:`backend.serving.routing.Router` -> detectors -> control models -> JSON response. A batch
larger than ``PREDICT_MAX_TASKS``, or too slow for Label Studio's wait by the measured latency, is
answered 413 and drafted by the pre-labeling job instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, jsonify, request

from backend.core.label_config import ProjectConfig
from backend.core.prelabel_queue import enqueue_prelabel
from backend.serving.routing import Abandoned
from backend.web.http import BadRequest, json_body, project_arg
from backend.web.state import app_services, current_services, current_settings
from backend.web.webhook import handle_event

log = logging.getLogger(__name__)
blueprint = Blueprint("protocol", __name__)


def interactive_query(params: Any, config: ProjectConfig) -> tuple[str | None, str | None]:
    """Text typed into the config's TextArea, and a label picked in the same context, if any."""
    context = params.get("context") if isinstance(params, dict) else None
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        return None, None
    texts, label = [], None
    for item in results:
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            continue
        text = value.get("text")
        if isinstance(text, list):
            texts.extend(str(t) for t in text if str(t).strip())
        elif isinstance(text, str) and text.strip():
            texts.append(text)
        for key, labels in value.items():
            if key.endswith("labels") and isinstance(labels, list) and labels:
                label = label or config.match_label(str(labels[0]))
    query = " ".join(texts).strip() or None
    return query, (label or (config.labels[0].value if query else None))


@blueprint.get("/health")
def health():
    """Liveness for Label Studio: never touches a model, Redis or a queue.

    ``status`` is "warming" while the worker's warm-up runs (gunicorn.conf.py), then "UP"; always 200,
    since Label Studio's check wants only a 200 (and the worker does answer, just not yet at full speed).
    """
    settings = current_settings()
    slot = app_services()
    return jsonify(status="warming" if slot.warming else "UP", warm_up=slot.warm_up, model_class="GeminiYoloBackend",
                   gemini=settings.gemini_enabled, routing=settings.routing)


@blueprint.post("/setup")
def setup():
    body = json_body()
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise BadRequest("'schema' (the label config) is required")
    config = ProjectConfig.parse(schema)
    project = project_arg(body.get("project"))
    try:
        return jsonify(model_version=current_services().predictor.model_version(project, config))
    except FileNotFoundError as exc:
        raise BadRequest(str(exc)) from exc


def _background(tasks: list, project: str, label_config: str, settings) -> str | None:
    """Hand the batch to the pre-labeling job (it stores drafts through the API with /setup's version).

    Only the task objects are copied into the job's payload (a task that is not one cannot be drafted
    anyway); the count was checked before, on the parsed list, so no payload is built past the caps.
    """
    own = [t for t in tasks if isinstance(t, dict)]
    return enqueue_prelabel(current_services().redis, project, tasks=own, label_config=label_config, settings=settings)


@blueprint.post("/predict")
def predict():
    """Answer inline when the batch fits Label Studio's wait, else draft it in the background.

    Label Studio stores nothing for a non-200 answer (docs/label-studio.md#the-predict-answer), so each
    task is drafted exactly once: in the answer, or by the job. 413: too many tasks, or too slow by the
    measured latency (:meth:`Predictor.plan`); 504: an inline batch reached its deadline, and the job
    takes it whole (the Gemini answers already paid for come from the cache).
    """
    started = time.monotonic()
    settings = current_settings()
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list")
    label_config = body.get("label_config")
    if not isinstance(label_config, str):
        raise BadRequest("'label_config' is required")
    config = ProjectConfig.parse(label_config)
    first = tasks[0] if isinstance(tasks[0], dict) else {}
    project = project_arg(body.get("project") or first.get("project"))
    predictor = current_services().predictor
    if len(tasks) > settings.predict_max_tasks:
        job_id = _background(tasks, project, label_config, settings)
        return jsonify(error="too_many_tasks", message=(
            f"{len(tasks)} tasks exceed PREDICT_MAX_TASKS={settings.predict_max_tasks}; "
            f"drafting them in the background (job {job_id}); predictions appear as they are stored")), 413
    query, query_label = interactive_query(body.get("params"), config)
    try:
        plan = predictor.plan(len(tasks), config, project)
        if not plan.inline:
            job_id = _background(tasks, project, label_config, settings)
            log.info("/predict of %d tasks: estimated %.0f s > %.0f s inline budget; job %s", len(tasks),
                     plan.estimate_s, plan.budget_s, job_id)
            return jsonify(error="too_slow_inline", message=(
                f"{len(tasks)} tasks need about {plan.estimate_s:.0f} s at the measured latency, more than "
                f"{plan.budget_s:.0f} s (PREDICT_INLINE_SHARE of PREDICT_TIMEOUT); drafting them in the background "
                f"(job {job_id}); predictions appear as they are stored")), 413
        deadline = started + settings.predict_timeout * settings.predict_deadline_share
        predictions = predictor.predict(tasks, config, project, query=query, query_label=query_label, deadline=deadline)
    except FileNotFoundError as exc:  # a model_path attribute naming no checkpoint inside MODEL_DIR
        raise BadRequest(str(exc)) from exc
    except Abandoned:
        # an interactive request (a prompt typed by an annotator) is not drafted in the background without it
        job_id = _background(tasks, project, label_config, settings) if query is None else None
        log.warning("/predict of %d tasks passed its deadline after %.0f s; job %s drafts them", len(tasks),
                    time.monotonic() - started, job_id)
        return jsonify(error="deadline", message=(
            f"{len(tasks)} tasks were not drafted within {settings.predict_timeout * settings.predict_deadline_share:.0f} s "
            f"(PREDICT_DEADLINE_SHARE of PREDICT_TIMEOUT); drafting them in the background (job {job_id}); "
            "predictions appear as they are stored")), 504
    return jsonify(results=predictions)


@blueprint.post("/webhook")
def webhook():
    result = handle_event(request.get_json(silent=True), current_services().redis, current_settings())
    return jsonify(result.body), result.status


@blueprint.get("/versions")
def versions():
    services = current_services()
    names = [f"yolo:{v.version}" for p in services.registry.projects() for v in services.registry.versions(p)]
    return jsonify(versions=sorted(set(names)), loaded=services.models.loaded())
