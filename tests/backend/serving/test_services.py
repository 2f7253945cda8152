"""backend.serving.services: a job's predictor loads the current model once and starts no watcher thread."""

from __future__ import annotations

import threading
import uuid

import redis

from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.serving.services import JobModels, build_predictor
from tests.models import make_checkpoint

WATCHER_THREADS = {"model-hotswap", "model-pubsub"}  # the names ModelHolder gives its threads


def watcher_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name in WATCHER_THREADS}


def test_job_predictor_serves_the_current_version_loaded_once_without_watchers(tmp_path, redis_url):
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", redis_url=redis_url, gemini_api_key="",
                        routing="yolo")
    client = redis.Redis.from_url(redis_url)
    project = str(800000 + uuid.uuid4().int % 99999)
    registry = ModelRegistry(settings.model_dir, client)
    checkpoint = make_checkpoint(tmp_path / "m.pt", ["Car", "Person"])
    registry.promote(project, registry.add_version(project, checkpoint, {"classes": ["Car", "Person"]}).version)

    before = watcher_threads()
    predictor = build_predictor(settings, client)
    try:
        assert isinstance(predictor.models, JobModels) and predictor.gemini is None
        assert predictor.model_version(project) == "yolo:v0001"
        model = predictor.models.get(project)
        assert model is not None and model.version == "v0001"
        registry.promote(project, registry.add_version(project, checkpoint, {"classes": ["Car", "Person"]}).version)
        assert predictor.models.get(project) is model  # the job keeps the model it started with
        assert predictor.model_version(project) == "yolo:v0001"
        assert watcher_threads() == before
    finally:
        predictor.close()
