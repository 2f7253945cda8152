"""The status page: ``GET /`` (HTML), ``GET /status.json`` (its data), scripts and styles under ``/static/``.

The page is one HTML file (``templates/status.html``) and one vanilla script (``static/status.js``)
that polls ``/status.json`` and draws its charts as SVG: nothing is fetched from another host. All
three are protected like the other read routes (``backend.web.auth``: they are not open routes), and
the rollback button posts to ``/models/rollback`` with the same credential.
"""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, jsonify, render_template, request

from backend.serving.status import collect
from backend.web.http import project_arg
from backend.web.state import current_services, current_settings

blueprint = Blueprint("status", __name__)


@blueprint.get("/")
def page():
    # A caller authenticated with ?token= (no Basic auth to replay) needs it on the page's own assets too;
    # it is the caller's own credential, echoed into its own page, never logged (backend.core.logs).
    token = request.args.get("token")
    return render_template("status.html", suffix="?" + urlencode({"token": token}) if token else "")


@blueprint.get("/status.json")
def status_json():
    project = request.args.get("project")
    services = current_services()
    return jsonify(collect(current_settings(), services.redis, services.registry,
                           project_arg(project) if project else None))
