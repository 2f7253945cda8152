"""Model registry routes: ``/models`` (what is registered and served) and ``/models/rollback``."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from backend.core.registry import describe
from backend.web.http import BadRequest, project_arg
from backend.web.state import current_services

blueprint = Blueprint("models", __name__)


@blueprint.get("/models")
def models():
    project = project_arg(request.args.get("project"))
    services = current_services()
    return jsonify(current=services.registry.current_version(project), serving=services.models.loaded().get(project),
                   versions=[describe(v) for v in services.registry.versions(project)])


@blueprint.post("/models/rollback")
def rollback():
    body = request.get_json(silent=True) or {}
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    project = project_arg(body.get("project") or request.args.get("project"))
    version = body.get("version") or request.args.get("version")
    if version is not None and not isinstance(version, str):
        raise BadRequest("'version' must be a version name like v0003")
    try:
        info = current_services().registry.rollback(project, version)
    except KeyError as exc:
        return jsonify(error="not_found", message=str(exc.args[0])), 404
    return jsonify(current=info.version)
