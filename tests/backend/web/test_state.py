"""backend.web.state: an app's services live in ``app.extensions`` and are built on first use only."""

from __future__ import annotations

import threading

import pytest

from backend.core.settings import Settings
from backend.serving.services import build
from backend.web import state
from backend.web.app import create_app
from backend.web.state import EXTENSION, WARM_UP_THREAD, AppServices, app_services, start_warm_up


@pytest.fixture
def settings(tmp_path, redis_url) -> Settings:
    return Settings(redis_url=redis_url, model_dir=tmp_path / "models", data_dir=tmp_path / "data", gemini_api_key="",
                    basic_auth_user="", basic_auth_pass="", webhook_secret="")


def test_given_services_are_the_apps_extension(settings):
    services = build(settings)
    app = create_app(settings, services)
    slot = app.extensions[EXTENSION]
    assert isinstance(slot, AppServices) and slot is app_services(app)
    assert slot.built and slot.get() is services and slot.settings is settings
    response = app.test_client().get("/models?project=1")
    assert response.status_code == 200 and response.json == {"current": None, "serving": None, "versions": []}
    services.models.stop()


def test_services_are_built_on_first_use_once_and_per_app(settings):
    app, other = create_app(settings), create_app(settings)
    slot = app_services(app)
    assert not slot.built
    assert app.test_client().get("/health").status_code == 200
    assert not slot.built  # liveness never builds models or Redis clients (gunicorn forks after importing wsgi)
    assert app.test_client().get("/versions").status_code == 200
    assert slot.built
    built = slot.get()
    assert app.test_client().get("/versions").status_code == 200 and slot.get() is built
    assert not app_services(other).built  # no process-wide cache shared between apps
    built.models.stop()
    built.loader.close()


def test_health_says_warming_until_the_warm_up_is_done(settings, monkeypatch):
    release = threading.Event()

    def held_build(s):  # the real build, held back until the test has seen "warming"
        assert release.wait(10)
        return build(s)

    monkeypatch.setattr(state, "build", held_build)
    app = create_app(settings)
    client = app.test_client()
    assert client.get("/health").json["status"] == "UP" and client.get("/health").json["warm_up"] == "off"
    thread = start_warm_up(app)
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "warming" and health.json["warm_up"] == "warming"
    release.set()
    thread.join(30)
    assert not thread.is_alive()
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP" and health.json["warm_up"] == "done"
    slot = app_services(app)
    assert slot.built and slot.built_by == WARM_UP_THREAD
    built = slot.get()
    assert client.post("/setup", json={"project": 1, "schema": state.WARM_UP_CONFIG}).status_code == 200
    assert slot.get() is built and slot.built_by == WARM_UP_THREAD  # the request found them built
    built.models.stop()
    built.loader.close()
