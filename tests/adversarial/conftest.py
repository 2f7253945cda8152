"""Fixtures of the adversarial suite: a private Redis per module and the real app built on it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.adversarial import AppHandle, PrivateRedis, build_app


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def app_factory(tmp_path):
    """``make(redis_url, gemini=None, ls=None, **settings)`` -> :class:`AppHandle`; stopped after the test."""
    made: list[AppHandle] = []

    def make(redis_url: str, **kwargs) -> AppHandle:
        handle = build_app(tmp_path / f"app{len(made)}", redis_url, **kwargs)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        handle.services.models.stop()
        handle.services.loader.close()
