"""Gemini answer cache in Redis: the same image and question never pay twice.

The key hashes everything that changes the answer (image hash, prompt, model, request knobs and
a response-format version bumped when the prompt contract changes), so a config edit misses the
cache instead of serving stale labels. The raw answer text is stored, not Detections: parsing is
cheap and re-parsing lets parser fixes apply to cached answers. The cache is an optimisation only:
any Redis failure is a miss (logged once per outage), never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib

from backend.core import keys
from backend.core.connection import OutageLog
from backend.core.metrics import GEMINI_CACHE
from backend.detectors.gemini.cost import Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAnswer:
    """A Gemini answer as stored: raw text plus what is needed to parse and account it."""

    text: str
    usage: Usage = field(default_factory=Usage)
    model_version: str = ""
    finish_reason: str = ""

    def dumps(self) -> str:
        return json.dumps({"text": self.text, "usage": self.usage.to_dict(), "model_version": self.model_version,
                           "finish_reason": self.finish_reason})

    @classmethod
    def loads(cls, raw: str | bytes) -> CachedAnswer:
        data = json.loads(raw)
        return cls(str(data["text"]), Usage.from_dict(data.get("usage")), str(data.get("model_version", "")),
                   str(data.get("finish_reason", "")))


class AnswerCache:
    """Redis-backed answer cache; ``redis=None`` disables it (every lookup misses). Thread-safe."""

    def __init__(self, redis: redis_lib.Redis | None, ttl: int, prefix: str = keys.gemini_answers()) -> None:
        self._redis = redis
        self.ttl = int(ttl)
        self.prefix = prefix
        self._outage = OutageLog(log, "cache: Redis unavailable, Gemini answers are not cached until it returns",
                                 "cache: Redis is back, caching Gemini answers again")

    def key(self, image_sha256: str, prompt: str, model: str, params: Mapping[str, Any] | None = None) -> str:
        """The Redis key: sha256 over image hash, prompt, model and the answer-shaping params."""
        material = json.dumps(
            {"image": image_sha256, "prompt": prompt, "model": model, "params": dict(params or {})},
            sort_keys=True, default=str,
        )
        return keys.Keys.ANSWER.format(prefix=self.prefix, digest=hashlib.sha256(material.encode()).hexdigest())

    def get(self, key: str) -> CachedAnswer | None:
        if self._redis is None or self.ttl <= 0:
            return None
        try:
            raw = self._redis.get(key)
        except redis_lib.RedisError as exc:
            self._outage.down(exc)
            GEMINI_CACHE.labels(result="error").inc()
            return None
        self._outage.up()
        if raw is None:
            GEMINI_CACHE.labels(result="miss").inc()
            return None
        try:
            answer = CachedAnswer.loads(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("cache: unreadable entry %s ignored", key)
            GEMINI_CACHE.labels(result="miss").inc()
            return None
        GEMINI_CACHE.labels(result="hit").inc()
        return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        if self._redis is None or self.ttl <= 0:
            return
        try:
            self._redis.set(key, answer.dumps(), ex=self.ttl)
        except redis_lib.RedisError as exc:
            self._outage.down(exc)
            return
        self._outage.up()
