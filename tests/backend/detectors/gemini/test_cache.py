"""The Gemini answer cache: stable keys, TTL, and a Redis outage that is only ever a miss."""

from __future__ import annotations

import logging

import redis
from prometheus_client import REGISTRY

from backend.detectors.gemini.cache import AnswerCache, CachedAnswer
from backend.detectors.gemini.cost import Usage

DOWN_URL = "redis://127.0.0.1:1/15"
PARAMS = {"format": 1, "max_image_side": 1024, "max_objects": 25, "temperature": 0.5}




def counter(result: str) -> float:
    return REGISTRY.get_sample_value("lsb_gemini_cache_total", {"result": result}) or 0.0


def test_key_is_stable_and_changes_with_everything_that_changes_the_answer():
    cache = AnswerCache(None, 60, prefix="p")
    base = cache.key("sha", "prompt", "gemini-2.5-flash", PARAMS)
    assert base == cache.key("sha", "prompt", "gemini-2.5-flash", dict(reversed(list(PARAMS.items()))))
    assert base.startswith("p:") and len(base) == 2 + 64
    variants = [
        cache.key("sha2", "prompt", "gemini-2.5-flash", PARAMS),
        cache.key("sha", "prompt 2", "gemini-2.5-flash", PARAMS),
        cache.key("sha", "prompt", "gemini-2.5-flash-lite", PARAMS),
        cache.key("sha", "prompt", "gemini-2.5-flash", {**PARAMS, "max_image_side": 768}),
        cache.key("sha", "prompt", "gemini-2.5-flash", {**PARAMS, "max_objects": 10}),
        cache.key("sha", "prompt", "gemini-2.5-flash", {**PARAMS, "temperature": 0.0}),
        cache.key("sha", "prompt", "gemini-2.5-flash", {**PARAMS, "format": 2}),
    ]
    assert len(set(variants + [base])) == len(variants) + 1


def test_roundtrip_with_ttl_and_metrics(rdb):
    client, prefix = rdb
    cache = AnswerCache(client, 120, prefix=prefix)
    key = cache.key("sha", "prompt", "m", PARAMS)
    misses, hits = counter("miss"), counter("hit")
    assert cache.get(key) is None
    answer = CachedAnswer('[{"box_2d": [0, 0, 1, 1], "label": "Car"}]', Usage(300, 20, 0), "gemini-2.5-flash-001", "STOP")
    cache.put(key, answer)
    assert cache.get(key) == answer
    assert 0 < client.ttl(key) <= 120
    assert counter("miss") == misses + 1 and counter("hit") == hits + 1


def test_corrupt_entry_is_a_miss(rdb):
    client, prefix = rdb
    cache = AnswerCache(client, 60, prefix=prefix)
    client.set(f"{prefix}:bad", b"\x00not json")
    assert cache.get(f"{prefix}:bad") is None


def test_disabled_without_redis_or_ttl(rdb):
    client, prefix = rdb
    for cache in (AnswerCache(None, 60), AnswerCache(client, 0, prefix=prefix)):
        key = cache.key("sha", "p", "m")
        cache.put(key, CachedAnswer("[]"))
        assert cache.get(key) is None
    assert not list(client.scan_iter(f"{prefix}*"))


def test_redis_outage_is_a_silent_miss_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="backend.detectors.gemini.cache")
    cache = AnswerCache(redis.Redis.from_url(DOWN_URL, socket_connect_timeout=0.2), 60, prefix="test:cache:down")
    key = cache.key("sha", "p", "m")
    errors = counter("error")
    for _ in range(3):
        cache.put(key, CachedAnswer("[]"))
        assert cache.get(key) is None
    assert counter("error") == errors + 3
    assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 1
