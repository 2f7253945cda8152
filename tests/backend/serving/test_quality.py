"""Draft quality: what ROUTING=auto and /metrics read from the training job's measurements."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import redis

from backend.core.registry import ModelRegistry, VersionInfo
from backend.serving import quality


def info(meta: dict) -> VersionInfo:
    return VersionInfo("1", "v0001", Path("/nonexistent"), meta)


def test_yolo_preferred_only_when_measured_at_least_as_good_as_gemini():
    assert not quality.yolo_preferred(None)
    assert not quality.yolo_preferred(info({}))
    assert not quality.yolo_preferred(info({"metrics": {"map50": 0.9}}))  # Gemini never measured
    gemini = {"gemini": {"map50": 0.6, "n": 12}}
    assert quality.yolo_preferred(info({"metrics": {"map50": 0.6}, "draft_quality": gemini}))
    assert not quality.yolo_preferred(info({"metrics": {"map50": 0.59}, "draft_quality": gemini}))
    assert not quality.yolo_preferred(info({"metrics": {"map50": 0.9}, "draft_quality": {"gemini": {"map50": 0.6, "n": 0}}}))
    # A later evaluation of the same version (after a rejected challenger) wins over the promotion-time one.
    assert quality.yolo_preferred(info({"metrics": {"map50": 0.3}, "metrics_latest_val": {"map50": 0.7},
                                        "draft_quality": gemini}))


def test_gauges_from_redis(tmp_path, redis_url):
    project = str(700000 + uuid.uuid4().int % 99999)
    (tmp_path / project).mkdir()
    client = redis.Redis.from_url(redis_url)
    client.set(f"lsb:quality:{project}", json.dumps({
        "sources": {"gemini": {"precision": 0.5, "recall": 0.4, "map50": 0.3, "n": 5}},
        "model": {"version": "v0002", "map50": 0.8, "map50_95": 0.5},
    }))
    try:
        families = {f.name: f for f in quality.gauges(client, ModelRegistry(tmp_path, client))}
        drafts = {(s.labels["source"], s.labels["metric"]): s.value for s in families["lsb_draft_quality"].samples}
        assert drafts == {("gemini", "precision"): 0.5, ("gemini", "recall"): 0.4, ("gemini", "map50"): 0.3}
        model = {(s.labels["version"], s.labels["metric"]): s.value for s in families["lsb_model_quality"].samples}
        assert model == {("v0002", "map50"): 0.8, ("v0002", "map50_95"): 0.5}
    finally:
        client.delete(f"lsb:quality:{project}")


def test_gauges_survive_redis_down(tmp_path):
    (tmp_path / "3").mkdir()
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    families = quality.gauges(down, ModelRegistry(tmp_path, None))
    assert all(not f.samples for f in families)
