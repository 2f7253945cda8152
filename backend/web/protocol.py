"""Label Studio's ML backend protocol: ``/health``, ``/setup``, ``/predict``, ``/webhook``, ``/versions``.

Path of a prediction: ``/predict`` (here) -> :class:`backend.serving.predictor.Predictor` ->
:class:`backend.serving.routing.Router` -> detectors -> control models -> JSON response. A batch
larger than ``PREDICT_MAX_TASKS`` is answered 413 and drafted by the pre-labeling job instead.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from backend.core.label_config import ProjectConfig
from backend.core.queue import enqueue_prelabel
from backend.web.http import BadRequest, json_body, project_arg
from backend.web.state import app_services, current_services, current_settings
from backend.web.webhook import handle_event

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


@blueprint.post("/predict")
def predict():
    settings = current_settings()
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list")
    if not all(isinstance(t, dict) and isinstance(t.get("data", {}), dict) for t in tasks):
        raise BadRequest("every task must be an object with a 'data' object")
    label_config = body.get("label_config")
    if not isinstance(label_config, str):
        raise BadRequest("'label_config' is required")
    config = ProjectConfig.parse(label_config)
    project = project_arg(body.get("project") or tasks[0].get("project"))
    if len(tasks) > settings.predict_max_tasks:
        job_id = enqueue_prelabel(current_services().redis, project, tasks=tasks, label_config=label_config, settings=settings)
        return jsonify(error="too_many_tasks", message=(
            f"{len(tasks)} tasks exceed PREDICT_MAX_TASKS={settings.predict_max_tasks}; "
            f"drafting them in the background (job {job_id}); predictions appear as they are stored")), 413
    query, query_label = interactive_query(body.get("params"), config)
    try:
        predictions = current_services().predictor.predict(tasks, config, project, query=query, query_label=query_label)
    except FileNotFoundError as exc:  # a model_path attribute naming no checkpoint inside MODEL_DIR
        raise BadRequest(str(exc)) from exc
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
