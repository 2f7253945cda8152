"""Fuzzing every route from its OpenAPI description: no input makes the service answer 5xx.

Schemathesis generates schema-valid (positive) and schema-breaking (negative) requests for each
operation of GET /openapi.json and sends them through the real Flask app (WSGI, no network);
Hypothesis adds raw bodies of any bytes and content type, and deep /predict batches whose tasks carry
any kind of image value. The contract checked on every response:

- never a 5xx;
- every rejection is a 4xx whose body is JSON ``{"error": str, "message": non-empty str}``;
- status codes, content types and bodies conform to the description (so the description stays true).

Example counts are bounded (``LSB_FUZZ_EXAMPLES``, default 20 per operation and mode) and runs are
derandomized, so CI is reproducible and the module takes well under a minute; raise the count and set
``LSB_FUZZ_RANDOM=1`` locally to explore further.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

# Test dependencies (requirements: schemathesis, hypothesis): a missing one fails loudly, never skips.
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from backend.core.settings import Settings
from backend.web.openapi import build_spec
from tests.adversarial import CONFIG, PROJECT, build_app, car_picture, encode
from tests.models import make_checkpoint

EXAMPLES = int(os.environ.get("LSB_FUZZ_EXAMPLES", "20"))
DERANDOMIZE = os.environ.get("LSB_FUZZ_RANDOM", "") != "1"
OPERATIONS = [(path, method) for path, item in build_spec(Settings())["paths"].items() for method in item]
POST_ROUTES = sorted(path for path, method in OPERATIONS if method == "post")
INTERACTIVE_CONFIG = CONFIG.replace("</View>", '<TextArea name="prompt" toName="image"/></View>')


def fuzz_settings(max_examples: int = EXAMPLES):
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=DERANDOMIZE,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                    print_blob=True)


def assert_contract(method: str, path: str, status: int, body: bytes, content_type: str, sent: object = None) -> None:
    where = f"{method.upper()} {path} with {str(sent)[:300]!r}"
    assert status < 500, f"{where} -> {status}: {body[:500]!r}"
    if status >= 400:
        assert content_type.startswith("application/json"), f"{where} -> {status} {content_type}: {body[:300]!r}"
        payload = json.loads(body)
        assert isinstance(payload, dict), where
        assert isinstance(payload.get("error"), str) and payload["error"], (where, payload)
        assert isinstance(payload.get("message"), str) and payload["message"].strip(), (where, payload)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz-model") / "fuzz.pt", ["Car", "Person"])


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, private_redis):
    """The app with no Gemini and no Label Studio: every URL is refused or decoded locally, no network."""
    handle = build_app(tmp_path_factory.mktemp("fuzz"), private_redis.url, predict_max_tasks=8)
    yield handle
    handle.services.models.stop()


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app.app)


# --- schema-driven ---------------------------------------------------------------------------------

CONFORMANCE = [st_checks.status_code_conformance, st_checks.content_type_conformance, st_checks.response_schema_conformance]


@pytest.mark.parametrize("path,method", OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_operation_never_answers_5xx(fuzz_schema, path, method):
    operation = fuzz_schema[path][method.upper()]
    seen: dict[int, int] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @fuzz_settings()
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call()
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert_contract(method, path, response.status_code, response.content,
                            (response.headers.get("content-type") or [""])[0], case.body)
            case.validate_response(response, checks=CONFORMANCE)

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to break in an operation without inputs
    assert seen, "no request was sent"
    assert all(code < 500 for code in seen)


def test_without_credentials_every_protected_operation_is_401(tmp_path_factory, private_redis):
    handle = build_app(tmp_path_factory.mktemp("fuzz-auth"), private_redis.url, basic_auth_user="ls",
                       basic_auth_pass="pw-fuzz-0123456789", webhook_secret="hook-fuzz-0123456789")
    try:
        schema = schemathesis.openapi.from_wsgi("/openapi.json", handle.app)
        for path, method in OPERATIONS:
            open_route = build_spec(handle.settings)["paths"][path][method].get("security") == []

            @fuzz_settings(max_examples=5)
            @given(case=schema[path][method.upper()].as_strategy(generation_mode=GenerationMode.POSITIVE))
            def run(case):  # called right here, in this iteration: the loop variables are current
                response = case.call()
                if open_route:  # noqa: B023
                    assert response.status_code == 200, (path, response.status_code)  # noqa: B023
                else:
                    assert response.status_code == 401, (path, method, response.status_code)  # noqa: B023
                    assert response.json()["error"] == "unauthorized"

            run()
    finally:
        handle.services.models.stop()


# --- raw bodies ------------------------------------------------------------------------------------

CONTENT_TYPES = ["application/json", "application/json; charset=utf-16", "text/plain", "application/xml",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "application/octet-stream", ""]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
RAW_BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["tasks", "label_config", "project", "action", "schema", "version", "params"]),
                    JSON_VALUES, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n),   # nesting deeper than the JSON parser recurses
    st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@pytest.mark.parametrize("path", POST_ROUTES)
def test_raw_bodies_of_any_bytes_and_content_type(fuzz_app, path):
    client = fuzz_app.client

    @fuzz_settings(max_examples=3 * EXAMPLES)
    @given(body=RAW_BODIES, content_type=st.sampled_from(CONTENT_TYPES), query=st.sampled_from(["", "?project=1", "?project=x"]))
    def run(body, content_type, query):
        response = client.post(path + query, data=body, content_type=content_type or None)
        assert_contract("post", path, response.status_code, response.get_data(), response.content_type or "", body[:200])

    run()


# --- deep /predict ---------------------------------------------------------------------------------

TINY_PNG = "data:image/png;base64," + base64.b64encode(encode(car_picture())).decode()
URLS = st.sampled_from([
    "", " ", "/", "//", "/data/upload/1/a.png", "http://", "http://[::1", "http://%zz/", "s3://bucket/key.png", "gs://",
    "data:", "data:image/png;base64,", "data:image/png;base64,!!!!", TINY_PNG, TINY_PNG[:60], "file:///etc/passwd",
    "/data/local-files/?d=../../etc/passwd", "http://169.254.169.254/", "\x00", "h" * 5000, "https://example.com/a.jpg",
])
IMAGE_VALUES = st.one_of(
    URLS, st.text(max_size=40),
    st.binary(max_size=300).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.integers(), st.none(), st.booleans(), st.floats(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
TASK_IDS = st.one_of(st.integers(), st.none(), st.text(max_size=6), st.floats(), st.booleans(),
                     st.lists(st.integers(), max_size=2))
TASKS = st.lists(
    st.fixed_dictionaries({"id": TASK_IDS, "data": st.dictionaries(st.sampled_from(["image", "img", "text"]), IMAGE_VALUES,
                                                                   max_size=2)},
                          optional={"project": st.one_of(st.integers(), st.text(max_size=4)), "meta": JSON_VALUES}),
    min_size=1, max_size=4,
)
CONTEXT_ITEMS = st.lists(st.dictionaries(
    st.sampled_from(["from_name", "to_name", "type", "value"]),
    st.one_of(st.text(max_size=8), st.dictionaries(st.sampled_from(["text", "rectanglelabels", "x", "labels"]),
                                                   st.one_of(st.text(max_size=12), st.lists(st.text(max_size=8), max_size=2),
                                                             st.integers(), st.none()), max_size=3)),
    max_size=4), max_size=3)
PARAMS = st.one_of(st.none(), JSON_VALUES, st.fixed_dictionaries({"context": st.one_of(
    JSON_VALUES, st.fixed_dictionaries({"result": st.one_of(CONTEXT_ITEMS, JSON_VALUES)}))}))


def test_predict_batches_of_any_tasks_answer_one_valid_prediction_each(tmp_path, private_redis, checkpoint):
    from label_studio_sdk.label_interface import LabelInterface

    handle = build_app(tmp_path, private_redis.url, routing="yolo", yolo_model=str(checkpoint), predict_max_tasks=8)
    interface = LabelInterface(INTERACTIVE_CONFIG)
    try:
        @fuzz_settings(max_examples=2 * EXAMPLES)
        @given(tasks=TASKS, params=PARAMS, project=st.sampled_from([PROJECT, 7, "7", None]))
        def run(tasks, params, project):
            body = {"tasks": tasks, "label_config": INTERACTIVE_CONFIG, "params": params}
            if project is not None:
                body["project"] = project
            response = handle.client.post("/predict", json=body)
            assert_contract("post", "/predict", response.status_code, response.get_data(), response.content_type, body)
            if project is None and response.status_code == 400:
                assert "project" in response.json["message"]  # none in the body, none valid on the first task
                return
            assert response.status_code == 200, response.get_data()
            results = response.json["results"]
            assert len(results) == len(tasks)
            for prediction in results:
                assert prediction["model_version"] == "yolo:custom-fuzz"
                assert interface.validate_prediction(prediction, return_errors=True) == [], prediction

        run()
    finally:
        handle.services.models.stop()
