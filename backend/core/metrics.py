"""Prometheus metrics of the service, one place for every name.

Under gunicorn with several workers set ``PROMETHEUS_MULTIPROC_DIR`` (``make run`` does): each
process writes its samples there and ``/metrics`` aggregates them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREDICTIONS = Counter("lsb_predictions_total", "Task predictions served, by the detector that produced them", ["source"])
PREDICTION_FAILURES = Counter("lsb_prediction_failures_total", "Tasks answered with an empty prediction, by reason", ["reason"])
FALLBACKS = Counter("lsb_gemini_fallbacks_total", "Tasks Gemini did not serve, by reason", ["reason"])
GEMINI_CALLS = Counter("lsb_gemini_calls_total", "Gemini generateContent calls", ["model", "outcome"])
GEMINI_TOKENS = Counter("lsb_gemini_tokens_total", "Gemini tokens by kind (input, output, thinking)", ["model", "kind"])
GEMINI_COST = Counter("lsb_gemini_cost_usd_total", "Estimated Gemini spend in USD", ["model"])
GEMINI_CACHE = Counter("lsb_gemini_cache_total", "Gemini answer cache lookups", ["result"])
GEMINI_DROPPED = Counter("lsb_gemini_dropped_objects_total", "Objects dropped from Gemini answers, by reason", ["reason"])
REQUEST_SECONDS = Histogram("lsb_request_seconds", "HTTP request latency", ["route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100))
DETECT_SECONDS = Histogram("lsb_detect_seconds", "Per-task detection latency by source", ["source"],
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
HOTSWAPS = Counter("lsb_model_swaps_total", "Models loaded by hot-swap in this process", ["outcome"])
WEBHOOKS = Counter("lsb_webhooks_total", "Webhook events by action and outcome", ["action", "outcome"])


class _CallbackCollector(Collector):
    """Gauges computed at scrape time (draft quality from the registry, current versions)."""

    def __init__(self, callback: Callable[[], list[GaugeMetricFamily]]):
        self._callback = callback

    def collect(self):
        try:
            yield from self._callback()
        except Exception:  # a scrape must never fail because Redis or the registry is away
            return


_extra_collectors: dict[str, Callable[[], list[GaugeMetricFamily]]] = {}


def register_scrape_callback(name: str, callback: Callable[[], list[GaugeMetricFamily]]) -> None:
    """Add (or replace, by ``name``) gauges computed at scrape time, e.g. per-project draft quality."""
    _extra_collectors[name] = callback


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics``: all processes' samples when multiprocess is on."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry  # noqa: N811
    body = generate_latest(registry)
    if _extra_collectors:
        extra = CollectorRegistry()
        for callback in _extra_collectors.values():
            extra.register(_CallbackCollector(callback))
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST
