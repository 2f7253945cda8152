"""The hot-swap follows the disk pointer and repairs a Redis copy that fell behind (restored snapshot)."""

from __future__ import annotations

import uuid

import pytest
import redis

from backend.core import keys
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.serving.hotswap import ModelHolder
from tests.live import wait_for
from tests.models import make_checkpoint


@pytest.fixture
def project() -> str:
    return str(900000 + uuid.uuid4().int % 99999)


def test_a_stale_redis_pointer_neither_serves_nor_stays(tmp_path, redis_url, project):
    client = redis.Redis.from_url(redis_url)
    settings = Settings(model_dir=tmp_path / "models", redis_url=redis_url, hotswap_poll_seconds=0.2)
    registry = ModelRegistry(settings.model_dir, client)
    for seed in (0, 1):
        ckpt = make_checkpoint(tmp_path / f"m{seed}.pt", ["Car", "Person"], seed=seed)
        registry.promote(project, registry.add_version(project, ckpt, {"classes": ["Car", "Person"]}).version)
    client.set(keys.model_current(project), "v0001")  # Redis restored from a snapshot taken before v0002
    holder = ModelHolder(settings, registry)
    try:
        assert holder.get(project).version == "v0002"  # the disk pointer decides what serves
        assert wait_for(lambda: client.get(keys.model_current(project)) == b"v0002", 10,
                        message="the hot-swap poll to repair Redis")
    finally:
        holder.stop()
        client.delete(keys.model_current(project))
