"""HTTP routes: Label Studio's ML backend protocol plus training, model and metrics routes.

Request flow of a prediction: ``/predict`` (here) -> :class:`backend.serving.predictor.Predictor` ->
:class:`backend.serving.routing.Router` -> detectors -> control models -> JSON response.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis as redis_lib
from flask import Flask, Request, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.core import metrics
from backend.core.label_config import ProjectConfig, UnsupportedConfig
from backend.core.logs import configure_logging
from backend.core.registry import describe, project_key
from backend.core.settings import Settings, get_settings
from backend.serving import quality
from backend.serving.services import Services, get_services
from backend.web import auth
from backend.web.openapi import build_spec
from backend.web.webhook import BadEvent, handle_event

log = logging.getLogger(__name__)

OPEN_ROUTES = {"/health", "/openapi.json"}
WEBHOOK_ROUTES = {"/webhook"}
# Routes that change state accept the webhook secret as well as Basic auth, so they are never open
# when only WEBHOOK_SECRET is configured.
STATE_ROUTES = {"/webhook", "/train", "/prelabel", "/models/rollback"}


class BadRequest(ValueError):
    """Malformed input: answered 400 with the message."""


class _JSONProvider(DefaultJSONProvider):
    """Deeply nested JSON (``[[[[...]]]]``) makes the parser raise RecursionError, which Flask does
    not treat as a parse error: turn it into one, so it is a 400 like any other bad body."""

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


class _Request(Request):
    """werkzeug cuts a chunked body (no Content-Length) at MAX_CONTENT_LENGTH without an error (only a
    second read raises), so an oversized upload would surface as "not JSON": make it the 413 it is."""

    def get_data(self, *args, **kwargs):
        data = super().get_data(*args, **kwargs)
        limit = self.max_content_length
        if self.content_length is None and limit is not None and isinstance(data, (bytes, str)) and len(data) >= limit:
            raise RequestEntityTooLarge()
        return data


def _body_project() -> Any:
    """``project`` from a JSON object body, if the body is one (training and model routes)."""
    body = request.get_json(silent=True)
    return body.get("project") if isinstance(body, dict) else None


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _project_arg(value: Any) -> str:
    try:
        return project_key(value)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"'project' is required and must be a Label Studio project id: {exc}") from exc


def _interactive_query(params: Any, config: ProjectConfig) -> tuple[str | None, str | None]:
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


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask(__name__)
    app.request_class = _Request
    app.json = _JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024
    app.json.sort_keys = False
    if not settings.webhook_secret.get_secret_value() and not settings.basic_auth_enabled:
        log.warning("WEBHOOK_SECRET and BASIC_AUTH_* are unset: /webhook and the training routes are open to anyone who can reach this port")
    elif not settings.basic_auth_enabled:
        log.warning("WEBHOOK_SECRET is set but BASIC_AUTH_* is not: Label Studio's 'Start Training' button sends only "
                    "Basic auth and will be refused; set BASIC_AUTH_USER/BASIC_AUTH_PASS (and enter them in Label Studio), "
                    "or train with POST /train?project=ID&token=<secret>")

    def svc() -> Services:
        return services or get_services()

    metrics.register_scrape_callback("quality", lambda: quality.gauges(svc().redis, svc().registry))

    @app.before_request
    def _authenticate():
        g.started = time.perf_counter()
        if request.path in OPEN_ROUTES:
            return None
        ok = auth.webhook_ok(request, settings) if request.path in STATE_ROUTES else auth.basic_auth_ok(request, settings)
        if not ok:
            response = jsonify(error="unauthorized", message="missing or wrong credentials")
            response.status_code = 401
            if request.path not in WEBHOOK_ROUTES:
                response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
            return response
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.REQUEST_SECONDS.labels(rule).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(BadRequest)
    @app.errorhandler(BadEvent)
    @app.errorhandler(UnsupportedConfig)
    def _bad_request(exc):
        return jsonify(error="bad_request", message=str(exc)), 400

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify(error=exc.name.lower().replace(" ", "_"), message=exc.description), exc.code

    @app.errorhandler(redis_lib.RedisError)
    def _redis_down(exc):
        log.error("redis unavailable: %s", type(exc).__name__)
        return jsonify(error="unavailable", message="queue (Redis) unavailable, try again"), 503

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("unhandled error on %s", request.path)
        return jsonify(error="internal_error", message=f"{type(exc).__name__}: see the backend log"), 500

    # --- Label Studio protocol -------------------------------------------------------------------

    @app.get("/health")
    def health():
        """Liveness for Label Studio: never touches a model, Redis or a queue."""
        return jsonify(status="UP", model_class="GeminiYoloBackend", gemini=settings.gemini_enabled, routing=settings.routing)

    @app.get("/openapi.json")
    def openapi():
        """Every route described in OpenAPI 3 (open like /health: it holds no secret)."""
        return jsonify(build_spec(settings))

    @app.post("/setup")
    def setup():
        body = _json_body()
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise BadRequest("'schema' (the label config) is required")
        config = ProjectConfig.parse(schema)
        project = _project_arg(body.get("project"))
        try:
            return jsonify(model_version=svc().predictor.model_version(project, config))
        except FileNotFoundError as exc:
            raise BadRequest(str(exc)) from exc

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list")
        if not all(isinstance(t, dict) and isinstance(t.get("data", {}), dict) for t in tasks):
            raise BadRequest("every task must be an object with a 'data' object")
        label_config = body.get("label_config")
        if not isinstance(label_config, str):
            raise BadRequest("'label_config' is required")
        config = ProjectConfig.parse(label_config)
        project = _project_arg(body.get("project") or tasks[0].get("project"))
        if len(tasks) > settings.predict_max_tasks:
            from backend.core.queue import enqueue_prelabel

            job_id = enqueue_prelabel(svc().redis, project, tasks=tasks, label_config=label_config, settings=settings)
            return jsonify(error="too_many_tasks", message=(
                f"{len(tasks)} tasks exceed PREDICT_MAX_TASKS={settings.predict_max_tasks}; "
                f"drafting them in the background (job {job_id}); predictions appear as they are stored")), 413
        query, query_label = _interactive_query(body.get("params"), config)
        try:
            predictions = svc().predictor.predict(tasks, config, project, query=query, query_label=query_label)
        except FileNotFoundError as exc:  # a model_path attribute naming no checkpoint inside MODEL_DIR
            raise BadRequest(str(exc)) from exc
        return jsonify(results=predictions)

    @app.post("/webhook")
    def webhook():
        result = handle_event(request.get_json(silent=True), svc().redis, settings)
        return jsonify(result.body), result.status

    @app.get("/versions")
    def versions():
        s = svc()
        names = [f"yolo:{v.version}" for p in s.registry.projects() for v in s.registry.versions(p)]
        return jsonify(versions=sorted(set(names)), loaded=s.models.loaded())

    @app.get("/metrics")
    def metrics_route():
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    # --- training and models ---------------------------------------------------------------------

    from backend.core import queue as training_queue
    from backend.core.queue import enqueue_prelabel

    @app.get("/train/status")
    def train_status():
        project = _project_arg(request.args.get("project"))
        return jsonify(training_queue.training_status(svc().redis, project))

    @app.post("/train")
    def train():
        project = _project_arg(request.args.get("project") or _body_project())
        return jsonify(training_queue.request_training(svc().redis, project, force=True)), 202

    @app.post("/prelabel")
    def prelabel():
        project = _project_arg(request.args.get("project") or _body_project())
        return jsonify(job_id=enqueue_prelabel(svc().redis, project, settings=settings)), 202

    @app.get("/models")
    def models():
        project = _project_arg(request.args.get("project"))
        s = svc()
        return jsonify(current=s.registry.current_version(project), serving=s.models.loaded().get(project),
                       versions=[describe(v) for v in s.registry.versions(project)])

    @app.post("/models/rollback")
    def rollback():
        body = request.get_json(silent=True) or {}
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        project = _project_arg(body.get("project") or request.args.get("project"))
        version = body.get("version") or request.args.get("version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("'version' must be a version name like v0003")
        try:
            info = svc().registry.rollback(project, version)
        except KeyError as exc:
            return jsonify(error="not_found", message=str(exc.args[0])), 404
        return jsonify(current=info.version)

    return app
