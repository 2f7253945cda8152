"""The Flask application factory: one blueprint per concern, the services in ``app.extensions``.

Blueprints: :mod:`~backend.web.protocol` (Label Studio's ML backend protocol), :mod:`~backend.web.training`
(training and pre-labeling jobs), :mod:`~backend.web.models` (registry), :mod:`~backend.web.metrics`
(Prometheus), :mod:`~backend.web.status` (the status page) and :mod:`~backend.web.openapi` (the API
description). Shared plumbing (request class, JSON provider, error answers) is in :mod:`~backend.web.http`,
who may call what in :mod:`~backend.web.auth`, and the lazily built services in :mod:`~backend.web.state`.
"""

from __future__ import annotations

import logging

from flask import Flask

from backend.core.logs import configure_logging
from backend.core.settings import Settings, get_settings
from backend.serving.services import Services
from backend.web import auth, http, metrics, models, openapi, protocol, state, status, training

log = logging.getLogger(__name__)


def _warn_about_open_routes(settings: Settings) -> None:
    if not auth.credentials_configured(settings):
        log.warning("WEBHOOK_SECRET and BASIC_AUTH_* are unset: every route is open to anyone who can reach this port "
                    "(predictions spend Gemini money, trainings and pre-labeling run on request)")
    elif not settings.basic_auth_enabled:
        log.warning("WEBHOOK_SECRET is set but BASIC_AUTH_* is not: every route but /health and /openapi.json needs the "
                    "secret, and Label Studio sends only Basic auth to /setup, /predict, /versions and 'Start Training', "
                    "so it cannot connect; set BASIC_AUTH_USER/BASIC_AUTH_PASS and enter them in Label Studio")


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """The app for ``settings`` (default: the environment's). Without ``services`` they are built on first use."""
    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask(__name__)
    http.install(app, settings.max_request_mb)
    state.install(app, settings, services)
    _warn_about_open_routes(settings)
    # First, so the request timer starts before the credential check (a 401 is timed too).
    app.register_blueprint(metrics.blueprint)
    app.before_request(auth.require_credentials)
    for blueprint in (protocol.blueprint, openapi.blueprint, training.blueprint, models.blueprint, status.blueprint):
        app.register_blueprint(blueprint)
    return app
