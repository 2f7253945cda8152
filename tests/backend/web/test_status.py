"""GET /, /status.json and the page's static files: same auth as the other read routes, same data as the registry."""

from __future__ import annotations

import pytest

from backend.core.registry import ModelRegistry
from backend.serving.services import build
from backend.web.app import create_app
from tests.worker_fixtures import make_settings

SECRET = "status-secret-1234"


@pytest.fixture
def client(tmp_path, redis15, project_id):
    settings = make_settings(tmp_path, None, webhook_secret=SECRET, label_studio_url="http://ls:8080")
    registry = ModelRegistry(settings.model_dir, redis15)
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(b"x")
    for map50 in (0.4, 0.6):
        registry.promote(project_id, registry.add_version(project_id, checkpoint, {"metrics": {"map50": map50}}).version)
    services = build(settings)
    client = create_app(settings, services).test_client()
    yield client
    services.models.stop()


@pytest.mark.parametrize("path", ["/", "/status.json", "/static/status.js", "/static/status.css"])
def test_every_part_of_the_page_needs_the_credential(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"X-Webhook-Secret": SECRET}).status_code == 200
    assert client.get(path, query_string={"token": SECRET}).status_code == 200


def test_the_page_carries_a_token_to_its_own_assets_and_loads_nothing_from_elsewhere(client):
    html = client.get("/", query_string={"token": SECRET}).get_data(as_text=True)
    assert f'src="static/status.js?token={SECRET}"' in html and f'href="static/status.css?token={SECRET}"' in html
    script = client.get("/static/status.js", query_string={"token": SECRET}).get_data(as_text=True)
    for text in (html, script):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_status_json_follows_a_rollback(client, project_id):
    hook = {"X-Webhook-Secret": SECRET}
    page = client.get("/status.json", headers=hook).get_json()
    project = next(p for p in page["projects"] if p["project"] == str(project_id))
    assert project["current_version"] == "v0002"
    assert [v["map50"] for v in project["versions"]] == [0.4, 0.6]
    assert project["links"]["project"] == f"http://ls:8080/projects/{project_id}/data"
    response = client.post("/models/rollback", json={"project": project_id, "version": "v0001"}, headers=hook)
    assert response.status_code == 200
    one = client.get("/status.json", query_string={"project": project_id}, headers=hook).get_json()
    assert [p["current_version"] for p in one["projects"]] == ["v0001"]
    assert client.get("/status.json", query_string={"project": "x"}, headers=hook).status_code == 400
