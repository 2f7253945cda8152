"""Per-process state that requests reach stays bounded: metric label values, parsed configs, served projects."""

from __future__ import annotations

import uuid

import pytest

from backend.core import label_config, metrics
from backend.core.settings import Settings
from backend.web.app import create_app
from backend.web.state import app_services

MODEL_CACHE_SIZE = 4


def config_for(image_key: str) -> str:
    return (f'<View><Image name="image" value="${image_key}"/>'
            '<RectangleLabels name="label" toName="image"><Label value="Car"/></RectangleLabels></View>')


@pytest.fixture
def app(tmp_path, redis_url):
    settings = Settings(redis_url=redis_url, model_dir=tmp_path / "models", data_dir=tmp_path / "data", gemini_api_key="",
                        basic_auth_user="", basic_auth_pass="", webhook_secret="", model_cache_size=MODEL_CACHE_SIZE)
    app = create_app(settings)
    yield app
    slot = app_services(app)
    if slot.built:
        slot.get().models.stop()
        slot.get().loader.close()


def label_values(metric, name: str) -> set[str]:
    return {sample.labels[name] for family in metric.collect() for sample in family.samples if name in sample.labels}


def test_route_labels_are_url_templates_never_paths(app):
    client = app.test_client()
    for i in range(10_000):
        assert client.get(f"/no/such/path/{i}?project={i}").status_code == 404
    assert client.get("/health?probe=1").status_code == 200
    routes = label_values(metrics.REQUEST_SECONDS, "route")
    assert routes <= {rule.rule for rule in app.url_map.iter_rules()} | {"unmatched"}, routes
    assert "/health" in routes and "unmatched" in routes


def test_failure_reasons_never_carry_request_data(app):
    """The reason text quotes the config's image key; the metric label keeps only a known code."""
    client = app.test_client()
    for i in range(300):
        key = f"img{uuid.uuid4().hex[:8]}"
        response = client.post("/predict", json={"tasks": [{"id": i, "data": {"image": "/data/upload/1/a.png"}}],
                                                 "label_config": config_for(key), "project": 1})
        assert response.status_code == 200 and response.json["results"][0]["result"] == []
    reasons = label_values(metrics.PREDICTION_FAILURES, "reason")
    assert "no image url" in reasons
    assert not any("img" in reason for reason in reasons), reasons
    assert len(reasons) <= 2 + len(metrics.IMAGE_REASONS) + len(metrics.GEMINI_REASONS) + 1


def test_failure_reason_codes():
    assert metrics.failure_reason("image bomb: 9000x9000 exceeds IMAGE_MAX_PIXELS") == "image bomb"
    assert metrics.failure_reason("gemini budget; no YOLO model") == "gemini budget"
    assert metrics.failure_reason("no YOLO model") == "no YOLO model"
    assert metrics.failure_reason("image http://evil/x: y") == "image other"
    assert metrics.failure_reason("gemini error: KeyError") == "gemini error"
    assert metrics.failure_reason("task data has no 'secret-key' image URL") == "no image url"
    assert metrics.failure_reason("anything else at all") == metrics.failure_reason("") == "other"


def test_setup_for_many_project_ids_keeps_the_holder_bounded(app):
    client = app.test_client()
    base = 600000 + uuid.uuid4().int % 99999 * 1000
    for i in range(300):
        response = client.post("/setup", json={"project": base + i, "schema": config_for("image")})
        assert response.status_code == 200, response.json
    holder = app_services(app).get().models
    assert len(holder._load_locks) <= MODEL_CACHE_SIZE and len(holder._models) <= MODEL_CACHE_SIZE
    assert list(holder._load_locks) == [str(base + i) for i in range(300 - MODEL_CACHE_SIZE, 300)]
    assert label_config._parse_cached.cache_info().currsize <= label_config.CONFIG_CACHE_SIZE
