"""OpenAPI 3 description of every HTTP route, served at ``GET /openapi.json``.

One hand-written document (no framework generates it), kept honest by tests: ``tests/backend/web/test_openapi.py``
checks that it validates against the OpenAPI 3.0 schema, that it lists exactly the routes and
methods Flask serves, and that its examples are answered as documented; ``tests/adversarial``
fuzzes every operation from it (no 5xx, every rejection a 4xx with a JSON ``message``).

Limits that come from settings (``PREDICT_MAX_TASKS``, ``MAX_REQUEST_MB``) are written into the
descriptions of the process that serves the document.
"""

from __future__ import annotations

import copy
from typing import Any

from flask import Blueprint, jsonify

from backend.core.settings import Settings
from backend.web.state import current_settings

OPENAPI_VERSION = "3.0.3"
API_VERSION = "1"

EXAMPLE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Car" predicted_values="car,truck"/><Label value="Person"/>'
    "</RectangleLabels></View>"
)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, example: Any = None) -> dict:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _error(description: str) -> dict:
    return {"description": description, "content": _json(_ref("Error"))}


def _errors(*codes: int) -> dict:
    text = {
        400: "Malformed input; `message` says what is wrong.",
        401: "Missing or wrong credentials.",
        404: "No such version.",
        413: "Request body larger than MAX_REQUEST_MB.",
        503: "Redis (the queue) is unavailable; try again.",
    }
    return {str(code): _error(text[code]) for code in codes}


_PROJECT_ID = {
    "description": "Label Studio project: an id, or `<id>.<created timestamp>` as Label Studio sends it.",
    "anyOf": [
        {"type": "string", "pattern": r"^[0-9]{1,18}(\.[0-9]*)?$"},
        {"type": "integer", "minimum": 0, "maximum": 999_999_999_999_999_999},
    ],
}

_SCHEMAS: dict[str, dict] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "Stable code, e.g. bad_request, unauthorized, too_many_tasks."},
            "message": {"type": "string", "description": "What went wrong, for humans."},
        },
    },
    "ProjectId": _PROJECT_ID,
    "Task": {
        "type": "object",
        "description": ("A Label Studio task; `data` holds the image URL under the key the label config's "
                        "<Image value=\"$key\"> names."),
        "properties": {
            "id": {"type": "integer"},
            "data": {"type": "object", "additionalProperties": True},
            "project": _ref("ProjectId"),
        },
        "additionalProperties": True,
    },
    "Region": {
        "type": "object",
        "required": ["from_name", "to_name", "type", "value"],
        "properties": {
            "from_name": {"type": "string"},
            "to_name": {"type": "string"},
            "type": {"type": "string", "enum": ["rectanglelabels", "brushlabels", "polygonlabels"]},
            "original_width": {"type": "integer"},
            "original_height": {"type": "integer"},
            "image_rotation": {"type": "number"},
            "value": {"type": "object", "additionalProperties": True,
                      "description": "x, y, width, height in percent (0-100) of the image as shown (EXIF applied)."},
            "score": {"type": "number"},
            "meta": {"type": "object", "additionalProperties": True},
        },
        "additionalProperties": True,
    },
    "Prediction": {
        "type": "object",
        "required": ["result", "score", "model_version"],
        "properties": {
            "result": {"type": "array", "items": _ref("Region")},
            "score": {"type": "number"},
            "model_version": {"type": "string", "minLength": 1},
        },
    },
    "SetupRequest": {
        "type": "object",
        "required": ["schema", "project"],
        "properties": {
            "project": _ref("ProjectId"),
            "schema": {"type": "string", "description": "The project's label config (XML)."},
            "hostname": {"type": "string"},
            "access_token": {"type": "string"},
            "extra_params": {"nullable": True},
        },
        "additionalProperties": True,
    },
    "PredictRequest": {
        "type": "object",
        "required": ["tasks", "label_config"],
        "properties": {
            "tasks": {"type": "array", "minItems": 1, "items": _ref("Task")},
            "label_config": {"type": "string"},
            "project": _ref("ProjectId"),
            "params": {"type": "object", "additionalProperties": True,
                       "description": "`context.result` carries interactive prompts (TextArea text, picked label)."},
        },
        "additionalProperties": True,
    },
    "WebhookEvent": {
        "type": "object",
        "required": ["action"],
        "properties": {
            "action": {"type": "string", "minLength": 1,
                       "description": "ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED, ANNOTATIONS_DELETED, "
                                      "START_TRAINING, TASKS_CREATED, PROJECT_DELETED, PROJECT_CREATED; anything else is "
                                      "answered 200 and ignored. A repeated delivery is answered {\"status\": \"duplicate\"}."},
            "project": {"anyOf": [_ref("ProjectId"), {"type": "object", "additionalProperties": True}]},
            "annotation": {"type": "object", "additionalProperties": True},
            "tasks": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
        },
        "additionalProperties": True,
    },
    "ProjectBody": {
        "type": "object",
        "properties": {"project": _ref("ProjectId")},
        "additionalProperties": True,
    },
    "RollbackRequest": {
        "type": "object",
        "properties": {
            "project": _ref("ProjectId"),
            "version": {"type": "string", "description": "A version name like v0003; default: the one before the current."},
        },
        "additionalProperties": True,
    },
    "Object": {"type": "object", "additionalProperties": True},
}


# Every protected route takes the webhook secret as well as Basic auth (backend.web.auth.credentials_ok).
_SECRET_OR_BASIC = [{"webhookSecret": []}, {"webhookToken": []}, {"basicAuth": []}]


def _project_query(required: bool) -> dict:
    return {"name": "project", "in": "query", "required": required, "schema": _ref("ProjectId"),
            "example": "2"}


def _paths(settings: Settings) -> dict:
    max_tasks = settings.predict_max_tasks
    body_mb = settings.max_request_mb
    example_task = {"id": 1, "data": {"image": "/data/upload/2/car.jpg"}}
    return {
        "/health": {"get": {
            "operationId": "health", "tags": ["label-studio"], "security": [],
            "summary": "Liveness for Label Studio (never touches a model, Redis or a queue).",
            "responses": {"200": {"description": "Up; status is 'warming' while the worker warms up.", "content": _json({
                "type": "object", "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["UP", "warming"]},
                               "warm_up": {"type": "string", "enum": ["off", "warming", "done", "failed"]},
                               "model_class": {"type": "string"},
                               "gemini": {"type": "boolean"}, "routing": {"type": "string"}},
            })}},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["meta"], "security": [],
            "summary": "This document.",
            "responses": {"200": {"description": "OpenAPI 3 document.", "content": _json(_ref("Object"))}},
        }},
        "/setup": {"post": {
            "operationId": "setup", "tags": ["label-studio"],
            "summary": "Label Studio connects a project: validates the label config, answers the model version.",
            "requestBody": {"required": True, "content": _json(_ref("SetupRequest"),
                                                               {"project": "2.1795306664", "schema": EXAMPLE_CONFIG})},
            "responses": {
                "200": {"description": "The version predictions will carry.", "content": _json({
                    "type": "object", "required": ["model_version"],
                    "properties": {"model_version": {"type": "string", "minLength": 1}}})},
                **_errors(400, 401, 413),
            },
        }},
        "/predict": {"post": {
            "operationId": "predict", "tags": ["label-studio"],
            "summary": "Drafts for a batch of tasks: exactly one prediction per task, in order.",
            "description": (
                f"A task whose image cannot be used gets an empty prediction; the others are served. More than "
                f"PREDICT_MAX_TASKS={max_tasks} tasks are answered 413 `too_many_tasks` and drafted by a background "
                f"pre-labeling job instead (the message names the job). Bodies over MAX_REQUEST_MB={body_mb} are 413."
            ),
            "requestBody": {"required": True, "content": _json(_ref("PredictRequest"), {
                "tasks": [example_task], "label_config": EXAMPLE_CONFIG, "project": "2.1795306664"})},
            "responses": {
                "200": {"description": "One prediction per task.", "content": _json({
                    "type": "object", "required": ["results"],
                    "properties": {"results": {"type": "array", "items": _ref("Prediction")}}})},
                **_errors(400, 401, 413, 503),
            },
        }},
        "/webhook": {"post": {
            "operationId": "webhook", "tags": ["label-studio"],
            "security": _SECRET_OR_BASIC,
            "summary": "Label Studio events: queued at once (training, pre-labeling), never processed inline.",
            "requestBody": {"required": True, "content": _json(_ref("WebhookEvent"),
                                                               {"action": "START_TRAINING", "project": {"id": 2}})},
            "responses": {
                "200": {"description": "Counted, queued or ignored.", "content": _json(_ref("Object"))},
                "201": {"description": "Training queued (START_TRAINING).", "content": _json(_ref("Object"))},
                **_errors(400, 401, 413, 503),
            },
        }},
        "/versions": {"get": {
            "operationId": "versions", "tags": ["label-studio"],
            "summary": "YOLO versions on disk and the ones this process serves.",
            "responses": {
                "200": {"description": "Versions.", "content": _json({
                    "type": "object", "required": ["versions"],
                    "properties": {"versions": {"type": "array", "items": {"type": "string"}},
                                   "loaded": {"type": "object", "additionalProperties": {"type": "string"}}}})},
                **_errors(401),
            },
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["operations"],
            "summary": "Prometheus metrics (every gunicorn worker when PROMETHEUS_MULTIPROC_DIR is set).",
            "responses": {
                "200": {"description": "Exposition text.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(401),
            },
        }},
        "/train/status": {"get": {
            "operationId": "trainStatus", "tags": ["training"],
            "summary": ("Queued and running training, progress, last result, current version, and base_model: "
                        "what the last training started from (pretrained weights, or the random-init fallback and why)."),
            "parameters": [_project_query(True)],
            "responses": {
                "200": {"description": "Status.", "content": _json(_ref("Object"))},
                **_errors(400, 401, 503),
            },
        }},
        "/train": {"post": {
            "operationId": "train", "tags": ["training"], "security": _SECRET_OR_BASIC,
            "summary": "Queue a forced training (coalesced with one already queued).",
            "parameters": [_project_query(False)],
            "requestBody": {"required": False, "content": _json(_ref("ProjectBody"))},
            "responses": {
                "202": {"description": "Queued or coalesced.", "content": _json(_ref("Object"))},
                **_errors(400, 401, 413, 503),
            },
        }},
        "/prelabel": {"post": {
            "operationId": "prelabel", "tags": ["training"], "security": _SECRET_OR_BASIC,
            "summary": "Queue drafts for every task of the project that lacks one of the current version.",
            "parameters": [_project_query(False)],
            "requestBody": {"required": False, "content": _json(_ref("ProjectBody"))},
            "responses": {
                "202": {"description": "Queued.", "content": _json({
                    "type": "object", "required": ["job_id"], "properties": {"job_id": {"type": "string"}}})},
                **_errors(400, 401, 413, 503),
            },
        }},
        "/prelabel/status": {"get": {
            "operationId": "prelabelStatus", "tags": ["training"],
            "summary": ("The project's pre-labeling, cumulative: tasks imported, skipped by PRELABEL_ON_IMPORT, "
                        "queued, drafted, failed, not in the project, Gemini USD spent, and the last import's policy."),
            "parameters": [_project_query(True)],
            "responses": {
                "200": {"description": "Status.", "content": _json({
                    "type": "object",
                    "required": ["project", "imported", "skipped_policy", "queued", "drafted", "failed",
                                 "not_in_project", "tasks", "spent_usd", "last_import"],
                    "properties": {
                        "project": {"type": "string"},
                        **{name: {"type": "integer", "minimum": 0} for name in (
                            "imported", "skipped_policy", "queued", "drafted", "failed", "not_in_project", "tasks")},
                        "spent_usd": {"type": "number", "minimum": 0},
                        "updated_at": {"type": "number", "nullable": True},
                        "last_import": {"type": "object", "nullable": True},
                    }})},
                **_errors(400, 401, 503),
            },
        }},
        "/models": {"get": {
            "operationId": "models", "tags": ["models"],
            "summary": "The project's current, served and stored YOLO versions.",
            "parameters": [_project_query(True)],
            "responses": {
                "200": {"description": "Versions.", "content": _json({
                    "type": "object", "required": ["current", "serving", "versions"],
                    "properties": {"current": {"type": "string", "nullable": True},
                                   "serving": {"type": "string", "nullable": True},
                                   "versions": {"type": "array", "items": _ref("Object")}}})},
                **_errors(400, 401),
            },
        }},
        "/": {"get": {
            "operationId": "status_page", "tags": ["status"],
            "summary": "The status page (HTML; its script and style are served under /static/, nothing from elsewhere).",
            "parameters": [{"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                          **_errors(401)},
        }},
        "/status.json": {"get": {
            "operationId": "status_json", "tags": ["status"],
            "summary": "What the status page shows: versions, trainings, live progress, draft quality, money, failures.",
            "parameters": [_project_query(False)],
            "responses": {
                "200": {"description": "Status of every project (or one).", "content": _json({
                    "type": "object", "required": ["generated_at", "projects", "money", "totals"],
                    "properties": {"generated_at": {"type": "number"}, "routing": {"type": "string"},
                                   "projects": {"type": "array", "items": _ref("Object")},
                                   "money": {"type": "object", "nullable": True, "additionalProperties": True},
                                   "totals": {"type": "object", "nullable": True, "additionalProperties": True}}})},
                **_errors(400, 401),
            },
        }},
        "/models/rollback": {"post": {
            "operationId": "rollback", "tags": ["models"], "security": _SECRET_OR_BASIC,
            "summary": "Serve an earlier version (every process switches within a second).",
            "parameters": [_project_query(False),
                           {"name": "version", "in": "query", "required": False, "schema": {"type": "string"}}],
            "requestBody": {"required": False, "content": _json(_ref("RollbackRequest"))},
            "responses": {
                "200": {"description": "Now current.", "content": _json({
                    "type": "object", "required": ["current"], "properties": {"current": {"type": "string"}}})},
                **_errors(400, 401, 404, 413, 503),
            },
        }},
    }


def build_spec(settings: Settings) -> dict:
    """The OpenAPI document for a process configured with ``settings`` (a fresh dict each call)."""
    return copy.deepcopy({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Label Studio ML backend: Gemini drafts, YOLO fallback",
            "version": API_VERSION,
            "description": (
                "Label Studio's ML backend protocol (/health, /setup, /predict, /webhook, /versions) plus training, "
                "model and metrics routes. When BASIC_AUTH_USER/BASIC_AUTH_PASS or WEBHOOK_SECRET is set, every route but "
                "/health and /openapi.json needs one of the configured credentials: HTTP Basic auth, or the secret as "
                "header X-Webhook-Secret or ?token=. With neither set every route is open. "
                "Every error is JSON: {\"error\": code, \"message\": text}."
            ),
        },
        "security": _SECRET_OR_BASIC,
        "tags": [{"name": n} for n in ("label-studio", "training", "models", "operations", "meta", "status")],
        "paths": _paths(settings),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic"},
                "webhookSecret": {"type": "apiKey", "in": "header", "name": "X-Webhook-Secret"},
                "webhookToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    })


blueprint = Blueprint("openapi", __name__)


@blueprint.get("/openapi.json")
def openapi():
    """Every route described in OpenAPI 3 (open like /health: it holds no secret)."""
    return jsonify(build_spec(current_settings()))
