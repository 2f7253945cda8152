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
GEMINI_TIER_COST = Counter("lsb_gemini_tier_cost_usd_total", "Estimated Gemini spend in USD by tier (standard, flex, batch)",
                           ["tier"])
GEMINI_FLEX_FALLBACKS = Counter("lsb_gemini_flex_fallbacks_total", "Flex calls refused or timed out, sent to the standard tier",
                                ["reason"])
GEMINI_FLEX_RETRIES = Counter("lsb_gemini_flex_retries_total", "Refused Flex calls (429/503) retried on Flex before any fallback",
                              ["reason"])
GEMINI_BATCHES = Counter("lsb_gemini_batches_total", "Gemini Batch API jobs by outcome (submitted, succeeded, failed, "
                         "cancelled, expired)", ["outcome"])
REQUEST_SECONDS = Histogram("lsb_request_seconds", "HTTP request latency", ["route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100))
DETECT_SECONDS = Histogram("lsb_detect_seconds", "Per-task detection latency by source", ["source"],
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
HOTSWAPS = Counter("lsb_model_swaps_total", "Models loaded by hot-swap in this process", ["outcome"])
WEBHOOKS = Counter("lsb_webhooks_total", "Webhook events by action and outcome", ["action", "outcome"])
PRELABEL_TASKS = Counter("lsb_prelabel_tasks_total",
                         "Tasks entering a pre-labeling state (backend.core.import_status.STATES, and 'imported')",
                         ["state"])
PRELABEL_COST = Counter("lsb_prelabel_cost_usd_total", "Estimated Gemini USD spent by pre-labeling jobs")
BASE_MODEL_FALLBACKS = Counter("lsb_base_model_fallback_total",
                               "First trainings started from random init because YOLO_BASE_MODEL's weights could not "
                               "be had, by reason (worker.training.base_model.FALLBACK_REASONS)", ["reason"])


# --- label values ------------------------------------------------------------------------------
# Every label value comes from a closed set written in code, never from request data: a label
# value is a time series kept for the life of the process (and of its multiprocess files). Routes
# are the URL rule's template (``/webhook/<token>``), never the path; a project id is never a label
# of these counters (the scrape-time quality gauges name the projects that have a trained model).

IMAGE_REASONS = frozenset({"forbidden_url", "not_found", "too_large", "timeout", "http_error", "not_an_image",
                           "unsupported_format", "decode_error", "bomb", "error"})
GEMINI_REASONS = frozenset({"not_configured", "budget", "circuit_open", "blocked", "timeout", "rate_limited",
                            "server_error", "client_error", "bad_answer", "deadline", "error"})
#: Tasks the request itself got wrong (backend.serving.predictor.task_image): empty prediction, others served.
TASK_REASONS = frozenset({"not_an_object", "no_data", "data_not_an_object", "image_not_a_string"})
OTHER = "other"


def failure_reason(reason: str) -> str:
    """The ``reason`` label of :data:`PREDICTION_FAILURES` for a task's free-text reason.

    Reasons read "image bomb: 9000x9000 exceeds ...", "gemini budget; no YOLO model" or "task data has
    no 'img' image URL": the text after the code may quote request data (a URL, the config's image
    key), so only the leading code is kept, and only when it is a known one.
    """
    code = str(reason).split(":")[0].split(";")[0].strip()
    source, _, kind = code.partition(" ")
    if source == "image":
        return f"image {kind if kind in IMAGE_REASONS else OTHER}"
    if source == "gemini":
        return f"gemini {kind if kind in GEMINI_REASONS else OTHER}"
    if code == "no YOLO model":
        return code
    if source == "task" and kind in TASK_REASONS:
        return f"task {kind}"
    if code.startswith("task data"):
        return "no image url"
    return OTHER


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
