"""Draft quality: how good each drafting source measured against the humans' final labels.

The training job measures, on its held-out tasks, the stored drafts per source (Gemini, YOLO) and
the current YOLO model, and keeps the figures in the version's meta and in Redis
(``lsb:quality:<project>``). Two readers: ``ROUTING=auto`` (YOLO first once it is at least as good
as Gemini's drafts) and ``/metrics`` (gauges per project and source).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis as redis_lib
from prometheus_client.core import GaugeMetricFamily

from backend.core import keys
from backend.core.registry import ModelRegistry, VersionInfo

log = logging.getLogger(__name__)

MIN_GEMINI_DRAFTS = 1  # tasks with Gemini drafts needed before the comparison means anything


def model_map50(meta: dict[str, Any]) -> float | None:
    """The YOLO version's held-out mAP50, from its newest evaluation."""
    metrics = meta.get("metrics_latest_val") or meta.get("metrics") or {}
    value = metrics.get("map50")
    return float(value) if value is not None else None


def yolo_preferred(info: VersionInfo | None) -> bool:
    """True once the current YOLO version measured at least as good as Gemini's drafts (mAP50)."""
    if info is None:
        return False
    yolo = model_map50(info.meta)
    gemini = (info.meta.get("draft_quality") or {}).get("gemini") or {}
    if yolo is None or gemini.get("map50") is None or int(gemini.get("n") or 0) < MIN_GEMINI_DRAFTS:
        return False
    return yolo >= float(gemini["map50"])


def read(redis: redis_lib.Redis, project: str) -> dict | None:
    """The latest draft quality of ``project`` as the training job stored it, or None."""
    raw = redis.get(keys.quality(project))
    return json.loads(raw) if raw else None


def gauges(redis: redis_lib.Redis, registry: ModelRegistry) -> list[GaugeMetricFamily]:
    """Prometheus gauges of every project's latest measurement (computed at scrape time)."""
    drafts = GaugeMetricFamily("lsb_draft_quality", "Stored drafts vs final human labels on held-out tasks",
                               labels=["project", "source", "metric"])
    model = GaugeMetricFamily("lsb_model_quality", "Current YOLO version on held-out tasks",
                              labels=["project", "version", "metric"])
    for project in registry.projects():
        try:
            payload = read(redis, project)
        except (redis_lib.RedisError, ValueError):
            payload = None
        if not payload:
            continue
        for source, figures in (payload.get("sources") or {}).items():
            for metric in ("precision", "recall", "map50"):
                if isinstance(figures, dict) and figures.get(metric) is not None:
                    drafts.add_metric([project, source, metric], float(figures[metric]))
        served = payload.get("model") or {}
        for metric in ("map50", "map50_95", "precision", "recall"):
            if served.get(metric) is not None:
                model.add_metric([project, str(served.get("version")), metric], float(served[metric]))
    return [drafts, model]
