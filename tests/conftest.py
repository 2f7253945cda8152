"""Shared test set-up: offline Ultralytics, a real Redis, isolated settings."""

from __future__ import annotations

import os
import tempfile

# Before anything imports ultralytics (docs/ultralytics.md#no-network).
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "lsb-test-ultralytics"))
# Exports cost seconds per promotion; tests that check them turn them back on explicitly.
os.environ.setdefault("EXPORT_FORMATS", "")
from backend.core import ultralytics_env  # noqa: E402

ultralytics_env.prepare()

import pytest  # noqa: E402
import redis  # noqa: E402

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:  # .ci/run and make test start one; say so clearly otherwise
        pytest.exit(f"Redis is not answering at {TEST_REDIS_URL}: {exc}. Start one (make run does) and re-run.", returncode=3)
    return TEST_REDIS_URL


@pytest.fixture
def redis_client(redis_url):
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def rdb(redis_client, request):
    """The test Redis and a key prefix only this test uses (deleted afterwards)."""
    import uuid

    prefix = f"test:{request.module.__name__.rsplit('.', 1)[-1]}:{uuid.uuid4().hex}"
    yield redis_client, prefix
    for key in redis_client.scan_iter(f"{prefix}*"):
        redis_client.delete(key)
