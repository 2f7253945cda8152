"""GET /openapi.json: a valid OpenAPI 3 document that describes exactly the routes Flask serves.

The fuzzing in tests/adversarial/test_http_fuzz.py trusts this document to reach every route, so it
must not drift: every Flask rule and method is documented and nothing else is, the document validates
against the OpenAPI 3.0 schema, and each documented request example is answered with a documented
status and a body matching the documented schema.
"""

from __future__ import annotations

import base64
import copy
import uuid

import jsonschema
import pytest
import redis
from rq import Queue

from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings
from backend.serving.services import build
from backend.web.app import create_app
from backend.web.auth import OPEN_ROUTES
from backend.web.openapi import EXAMPLE_CONFIG, build_spec

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def handle(tmp_path, redis_url, monkeypatch):
    prefix = f"openapi{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("LSB_QUEUE_PREFIX", prefix)
    made = []

    def make(**overrides):
        values = {"redis_url": redis_url, "model_dir": tmp_path / "models", "data_dir": tmp_path / "data"}
        values.update(overrides)
        settings = Settings(**values)
        services = build(settings)
        made.append(services)
        return create_app(settings, services), settings

    yield make
    for services in made:
        services.models.stop()
    # The examples queue real jobs on the shared db 15: remove them and the markers naming them.
    client = redis.Redis.from_url(redis_url)
    queue = Queue(f"{prefix}training", connection=client)
    for job_id in queue.job_ids:
        marker = client.get("lsb:train:2:pending")
        if marker and marker.decode().startswith(job_id + " "):
            client.delete("lsb:train:2:pending", "lsb:train:2:force")
        client.delete(f"rq:job:{job_id}")
    queue.delete(delete_jobs=True)
    client.srem("rq:queues", f"rq:queue:{prefix}training")


def _flask_operations(app) -> set[tuple[str, str]]:
    ops = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods or ():
            if method.lower() in METHODS:
                ops.add((rule.rule, method.lower()))
    return ops


def _documented_operations(spec: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in spec["paths"].items() for method in item if method in METHODS}


def _resolve(schema, components: dict):
    """Inline ``$ref``s and turn OpenAPI 3.0 ``nullable`` into JSON Schema, for jsonschema."""
    if isinstance(schema, list):
        return [_resolve(s, components) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return _resolve(components[schema["$ref"].rsplit("/", 1)[1]], components)
    out = {k: _resolve(v, components) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def test_served_without_credentials_even_with_basic_auth(handle):
    app, _ = handle(basic_auth_user="ls", basic_auth_pass="pw-0123456789", webhook_secret="hook-0123456789")
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    spec = response.json
    assert spec["openapi"].startswith("3.0")
    assert spec["paths"]["/health"]["get"]["security"] == [] and spec["paths"]["/openapi.json"]["get"]["security"] == []
    assert "pw-0123456789" not in response.get_data(as_text=True) and "hook-0123456789" not in response.get_data(as_text=True)
    # everything else stays closed
    assert app.test_client().get("/versions").status_code == 401


def test_documents_exactly_the_routes_flask_serves(handle):
    app, settings = handle()
    spec = app.test_client().get("/openapi.json").json
    assert _documented_operations(spec) == _flask_operations(app)
    assert spec == build_spec(settings)


def test_security_matches_the_app(handle):
    _, settings = handle()
    spec = build_spec(settings)
    for path, item in spec["paths"].items():
        for operation in item.values():
            security = operation.get("security", spec["security"])
            if path in OPEN_ROUTES:
                assert security == [], path
            else:  # any configured credential opens every other route (backend.web.auth.credentials_ok)
                assert security == [{"webhookSecret": []}, {"webhookToken": []}, {"basicAuth": []}], path


def test_is_a_valid_openapi_30_document(handle):
    import schemathesis  # slow to import (hypothesis, a dev dependency): only this test needs it

    app, settings = handle()
    schema = schemathesis.openapi.from_dict(build_spec(settings))
    schema.validate()  # raises on any violation of the OpenAPI 3.0 meta-schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.path, op.method.lower()) for op in operations} == _flask_operations(app)


def test_every_operation_documents_its_errors_as_json(handle):
    _, settings = handle()
    spec = build_spec(settings)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert any(code.startswith("2") for code in responses), (path, method)
            protected = operation.get("security", spec["security"]) != []
            assert ("401" in responses) == protected, (path, method)
            if method == "post":
                assert "413" in responses, (path, method)
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            assert operation["operationId"] and operation["summary"]


def test_limits_from_settings_are_in_the_descriptions(handle):
    _, settings = handle(predict_max_tasks=17, max_request_mb=3)
    text = build_spec(settings)["paths"]["/predict"]["post"]["description"]
    assert "PREDICT_MAX_TASKS=17" in text and "MAX_REQUEST_MB=3" in text


def test_examples_are_valid_and_answered_as_documented(handle):
    """Each request example validates against its schema and the app answers it with a documented
    status whose body validates against the documented response schema."""
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:pw-0123456789").decode()}
    app, settings = handle(basic_auth_user="ls", basic_auth_pass="pw-0123456789")
    client = app.test_client()
    spec = build_spec(settings)
    components = spec["components"]["schemas"]
    answered = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            media = (operation.get("requestBody") or {}).get("content", {}).get("application/json", {})
            if "example" not in media and method == "post":
                continue
            body = copy.deepcopy(media.get("example"))
            if body is not None:
                jsonschema.validate(body, _resolve(media["schema"], components))
            query = {p["name"]: p["example"] for p in operation.get("parameters", []) if "example" in p and p.get("required")}
            response = client.open(path, method=method.upper(), json=body, query_string=query, headers=auth)
            documented = operation["responses"]
            assert str(response.status_code) in documented, (path, method, response.status_code, response.get_data())
            content = documented[str(response.status_code)].get("content", {})
            if "application/json" in content:
                jsonschema.validate(response.json, _resolve(content["application/json"]["schema"], components))
            answered += 1
    assert answered >= 9


def test_example_label_config_is_one_the_backend_serves():
    config = ProjectConfig.parse(EXAMPLE_CONFIG)
    assert config.class_names == ["Car", "Person"] and config.image_key == "image"
