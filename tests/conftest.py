"""Shared test set-up: offline Ultralytics, a real Redis, isolated settings, and every shared fixture.

Fixtures shared by several folders are registered here (``pytest_plugins``) and never imported into a
test module: tests/worker_fixtures.py (Redis db, projects, fake Label Studio), tests/network_fixtures.py
(the image loader's network guard) and ``tiny_models`` below. Folder-only fixtures live in that folder's
conftest.py (tests/adversarial, tests/e2e). Helpers (functions, classes, constants) are imported as usual.
"""

from __future__ import annotations

import os
import tempfile
import uuid

# Before anything imports ultralytics (docs/ultralytics.md#no-network).
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "lsb-test-ultralytics"))
# Exports cost seconds per promotion; tests that check them turn them back on explicitly.
os.environ.setdefault("EXPORT_FORMATS", "")
# The default YOLO_BASE_MODEL (yolo11n.pt) would make a first training try Ultralytics' download: the suite
# never waits on the network. Tests of the pretrained start set it (tests/worker/training/test_base_model.py).
os.environ.setdefault("YOLO_BASE_MODEL", "yolo11n.yaml")
# Tests train by epochs (a few, tiny): the 5-minute default budget would make time= re-fit them to 5 minutes.
os.environ.setdefault("TRAIN_TIME_LIMIT_MIN", "0")
from backend.core import ultralytics_env  # noqa: E402

ultralytics_env.prepare()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402

from tests.models import make_tiny_owl, make_tiny_sam  # noqa: E402
from tests.paths import TEST_REDIS_URL  # noqa: E402

pytest_plugins = ["tests.worker_fixtures", "tests.network_fixtures", "tests.fake_gemini"]


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
    prefix = f"test:{request.module.__name__.rsplit('.', 1)[-1]}:{uuid.uuid4().hex}"
    yield redis_client, prefix
    for key in redis_client.scan_iter(f"{prefix}*"):
        redis_client.delete(key)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised OWLv2, OWL-ViT and SAM folders (built once per session; needs transformers)."""
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("tiny-hf")
    return {"owlv2": make_tiny_owl(root / "owlv2"), "owlvit": make_tiny_owl(root / "owlvit", "owlvit"),
            "sam": make_tiny_sam(root / "sam")}
