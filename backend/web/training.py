"""Training and pre-labeling routes: ``/train``, ``/train/status``, ``/prelabel``, ``/prelabel/status``.

They only enqueue or read RQ jobs (through :mod:`backend.core.queue`); the work runs in the worker.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from backend.core import import_status, prelabel_queue
from backend.core import queue as training_queue
from backend.web.http import body_project, project_arg
from backend.web.state import current_services, current_settings

blueprint = Blueprint("training", __name__)


@blueprint.get("/train/status")
def train_status():
    project = project_arg(request.args.get("project"))
    return jsonify(training_queue.training_status(current_services().redis, project))


@blueprint.get("/prelabel/status")
def prelabel_status():
    """What pre-labeling did with the project's imports (backend.core.import_status)."""
    project = project_arg(request.args.get("project"))
    return jsonify(import_status.read(current_services().redis, project))


@blueprint.post("/train")
def train():
    project = project_arg(request.args.get("project") or body_project())
    return jsonify(training_queue.request_training(current_services().redis, project, force=True)), 202


@blueprint.post("/prelabel")
def prelabel():
    project = project_arg(request.args.get("project") or body_project())
    job_id = prelabel_queue.enqueue_prelabel(current_services().redis, project, settings=current_settings())
    return jsonify(job_id=job_id), 202
