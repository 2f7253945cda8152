"""Prometheus: ``/metrics``, the per-route request timer, and the draft-quality gauges of this app."""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, g, request
from flask.blueprints import BlueprintSetupState

from backend.core import metrics
from backend.detectors.gemini.cost import money_gauges
from backend.serving import quality
from backend.web.state import app_services

blueprint = Blueprint("metrics", __name__)


@blueprint.record_once
def _register_quality_gauges(state: BlueprintSetupState) -> None:
    """Draft quality per project, read from Redis at scrape time with this app's services."""
    app: Flask = state.app

    def gauges():
        services = app_services(app).get()
        return quality.gauges(services.redis, services.registry)

    metrics.register_scrape_callback("quality", gauges)

    def money():
        gemini = app_services(app).get().gemini
        return money_gauges(gemini.cost if gemini is not None else None)

    metrics.register_scrape_callback("money", money)


@blueprint.before_app_request
def _start_timer() -> None:
    g.started = time.perf_counter()


@blueprint.after_app_request
def _observe(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule else "unmatched"
    metrics.REQUEST_SECONDS.labels(rule).observe(time.perf_counter() - g.get("started", time.perf_counter()))
    return response


@blueprint.get("/metrics")
def metrics_route():
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
