"""What serving is built from: the web app's long-lived :class:`Services`, or one job's :class:`Predictor`.

The web keeps its models current with hot-swap watcher threads (:class:`~backend.serving.hotswap.ModelHolder`).
An RQ job is short and must not start threads that outlive it: :func:`build_predictor` gives it the
same predictor code with each project's current model loaded once, on first use, and never watched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis as redis_lib

from backend.core.connection import SHARED_STATE_TIMEOUT_S, connect
from backend.core.images import ImageLoader
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector
from backend.serving.hotswap import ModelHolder
from backend.serving.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    redis: redis_lib.Redis
    registry: ModelRegistry
    models: ModelHolder
    loader: ImageLoader
    gemini: GeminiDetector | None
    predictor: Predictor


class JobModels(ModelHolder):
    """A job's YOLO models: each project's current version loaded on first use and kept for the whole job.

    No hot-swap watcher or pub/sub listener thread is ever started; the next job loads whatever is
    current then.
    """

    def _ensure_started(self) -> None:
        return None


def bulk_sync_tier(settings: Settings) -> str:
    """The synchronous tier of bulk work: flex for GEMINI_BULK_TIER flex, and for batch below its task count."""
    return "flex" if settings.gemini_bulk_tier in ("flex", "batch") else "standard"


def _gemini(settings: Settings, redis: redis_lib.Redis, tier: str = "standard") -> GeminiDetector | None:
    if not settings.gemini_enabled:
        log.warning("Gemini is not configured (no GEMINI_API_KEY): drafts come from the YOLO fallback only, "
                    "and tasks get empty predictions until a YOLO model is trained")
        return None
    log.info("Gemini drafting on with model %s (routing=%s)", settings.gemini_model, settings.routing)
    return GeminiDetector(settings, redis, tier=tier)


def build(settings: Settings) -> Services:
    """The web app's services (:mod:`backend.web.state` builds them on first use, after fork under gunicorn)."""
    redis = connect(settings.redis_url)  # short timeouts: a web route must never hang on Redis
    registry = ModelRegistry(settings.model_dir, redis)
    models = ModelHolder(settings, registry)
    loader = ImageLoader(settings)
    gemini = _gemini(settings, connect(settings.redis_url, SHARED_STATE_TIMEOUT_S))
    return Services(settings, redis, registry, models, loader, gemini, Predictor(settings, registry, models, loader, gemini))


def build_predictor(settings: Settings, redis: redis_lib.Redis, *, bulk: bool = False) -> Predictor:
    """A predictor for one job (pre-labeling): the code ``/predict`` runs, without watcher threads.

    Close it (:meth:`Predictor.close`) when the job ends; it shares Gemini's cache, spend and breaker
    with every other process through ``redis``. ``bulk``: Gemini drafts at GEMINI_BULK_TIER's synchronous tier
    (pre-labeling); interactive ``/predict`` never does.
    """
    registry = ModelRegistry(settings.model_dir, redis)
    return Predictor(settings, registry, JobModels(settings, registry), ImageLoader(settings),
                     _gemini(settings, redis, bulk_sync_tier(settings) if bulk else "standard"))
