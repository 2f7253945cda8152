"""backend.core.connection: the client factory and the once-per-outage log."""

from __future__ import annotations

import logging

import pytest
import redis

from backend.core.connection import PATIENT_TIMEOUT_S, WEB_TIMEOUT_S, OutageLog, connect, connect_patient

DOWN_URL = "redis://127.0.0.1:1/15"


def _kwargs(client: redis.Redis) -> dict:
    return client.connection_pool.connection_kwargs


def test_web_client_has_short_timeouts_and_bytes(redis_url):
    client = connect(redis_url)
    kwargs = _kwargs(client)
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == WEB_TIMEOUT_S
    assert kwargs["health_check_interval"] == 30
    assert not kwargs.get("decode_responses")  # RQ pickles: it needs bytes
    assert client.ping()


def test_patient_client_waits_longer_but_connects_quickly(redis_url):
    kwargs = _kwargs(connect_patient(redis_url))
    assert kwargs["socket_timeout"] == PATIENT_TIMEOUT_S and kwargs["socket_connect_timeout"] == 5.0


def test_down_redis_fails_fast():
    with pytest.raises(redis.RedisError):
        connect(DOWN_URL, 0.2).ping()


def test_outage_log_warns_once_per_outage(caplog):
    outage = OutageLog(logging.getLogger("test.outage"), "x: Redis unavailable", "x: Redis is back")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.up()  # nothing to say while all is well
        for _ in range(3):
            outage.down(ConnectionError("refused"))
        assert outage.failed
        outage.up()
        outage.up()
        outage.down(ConnectionError("again"))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["x: Redis unavailable: refused", "x: Redis is back", "x: Redis unavailable: again"]
