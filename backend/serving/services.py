"""Builds the long-lived objects of one process (web worker or RQ worker) once."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import redis as redis_lib

from backend.core.images import ImageLoader
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings, get_settings
from backend.detectors.gemini.client import GeminiDetector
from backend.serving.hotswap import ModelHolder
from backend.serving.predictor import Predictor

log = logging.getLogger(__name__)


def redis_client(settings: Settings, timeout: float = 0.5) -> redis_lib.Redis:
    """A client with short timeouts: a web route must never hang on Redis (LS waits 1 s)."""
    return redis_lib.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)


@dataclass
class Services:
    settings: Settings
    redis: redis_lib.Redis
    registry: ModelRegistry
    models: ModelHolder
    loader: ImageLoader
    gemini: GeminiDetector | None
    predictor: Predictor


def build(settings: Settings) -> Services:
    redis = redis_client(settings)
    registry = ModelRegistry(settings.model_dir, redis)
    models = ModelHolder(settings, registry)
    loader = ImageLoader(settings)
    gemini = GeminiDetector(settings, redis_client(settings, timeout=2.0)) if settings.gemini_enabled else None
    if gemini is None:
        log.warning("Gemini is not configured (no GEMINI_API_KEY): drafts come from the YOLO fallback only, "
                    "and tasks get empty predictions until a YOLO model is trained")
    else:
        log.info("Gemini drafting on with model %s (routing=%s)", settings.gemini_model, settings.routing)
    return Services(settings, redis, registry, models, loader, gemini, Predictor(settings, registry, models, loader, gemini))


@functools.lru_cache(maxsize=1)
def get_services() -> Services:
    """The process-wide services (built on first use, after fork under gunicorn)."""
    return build(get_settings())
