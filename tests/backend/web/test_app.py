"""The HTTP protocol Label Studio 1.23 speaks, replayed from recorded requests, through the real app.

Gemini is the fake server (through the real google-genai client), images come from a fake Label
Studio over real HTTP, Redis is real.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import uuid

import pytest
import redis
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image, ImageDraw
from rq import Queue

from backend.core import keys
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector
from backend.serving.services import build
from backend.web.app import create_app
from tests import fake_gemini as fg
from tests.fake_label_studio import FakeLabelStudio
from tests.models import make_checkpoint
from tests.paths import RECORDED_REQUESTS

FIXTURES = json.loads(RECORDED_REQUESTS.read_text())["requests"]
RED = (220, 30, 30)
UPLOAD = "/data/upload/2/51552cc7-green.jpg"


def red_car_image() -> bytes:
    image = Image.new("RGB", (64, 48), (40, 160, 60))
    ImageDraw.Draw(image).rectangle([10, 8, 41, 31], fill=RED)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake_ls():
    with FakeLabelStudio() as ls:
        ls.files[UPLOAD] = red_car_image()
        yield ls


@pytest.fixture(scope="module")
def gemini():
    with fg.FakeGemini(responder=fg.Oracle(colors={"Car": RED})) as fake:
        yield fake


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("m") / "fallback.pt", ["car", "Person"])


def make_settings(tmp_path, test_redis_url, fake_ls, gemini=None, **overrides) -> Settings:
    values = {
        "redis_url": test_redis_url, "model_dir": tmp_path / "models", "data_dir": tmp_path / "data",
        "label_studio_url": fake_ls.url, "label_studio_api_key": fake_ls.pat,
        "gemini_api_key": fg.DEFAULT_KEY if gemini else "", "gemini_base_url": gemini.base_url if gemini else "",
        "gemini_task_deadline": 5.0, "gemini_timeout": 2.0, "gemini_breaker_failures": 1000,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client_for(tmp_path, redis_url, fake_ls):
    made = []

    def make(gemini=None, **overrides):
        settings = make_settings(tmp_path, redis_url, fake_ls, gemini, **overrides)
        services = build(settings)
        if services.gemini is not None:  # isolate this test's cache and breaker in Redis
            prefix = f"lsb:test:{uuid.uuid4().hex}"
            services.gemini = GeminiDetector(settings, redis.Redis.from_url(redis_url), prefix=prefix)
            services.predictor.gemini = services.gemini
            services.predictor.router.gemini = services.gemini
        app = create_app(settings, services)
        made.append(services)
        client = app.test_client()
        client.services = services  # for the tests that read or prime the predictor's state
        return client

    yield make
    for services in made:
        services.models.stop()
    for name in ("training", "prelabel"):
        Queue(name, connection=redis.Redis.from_url(redis_url)).empty()
    client = redis.Redis.from_url(redis_url)  # the recorded project's dedupe and pre-labeling state (backend.web.webhook)
    client.delete(keys.prelabel_queued(2), keys.prelabel_tasks(2), keys.prelabel_status(2),
                  *client.scan_iter(keys.webhook_seen(2, "*")))


def replay(client, request: dict, headers: dict | None = None):
    body = request["body"]
    if request["method"] == "GET":
        return client.get(request["path"], headers=headers)
    return client.post(request["path"], json=body, headers=headers)


def validate(prediction: dict, label_config: str) -> list:
    return LabelInterface(label_config).validate_prediction(prediction, return_errors=True)


def setup_version(client, project="2.1795306664", schema=None) -> str:
    schema = schema or FIXTURES[1]["body"]["schema"]
    response = client.post("/setup", json={"project": project, "schema": schema})
    assert response.status_code == 200, response.json
    return response.json["model_version"]


# --- the recorded session -------------------------------------------------------------------------

def test_replay_of_every_recorded_request_with_gemini(client_for, gemini):
    client = client_for(gemini)
    gemini.clear()
    for request in FIXTURES:
        response = replay(client, request)
        assert response.status_code in (200, 201), (request["path"], response.status_code, response.json)
        if request["path"] == "/setup":
            assert response.json["model_version"] == "gemini:gemini-2.5-flash"
        if request["path"] == "/predict":
            body = request["body"]
            results = response.json["results"]
            assert len(results) == len(body["tasks"])
            for prediction in results:
                assert prediction["model_version"] == setup_version(client)
                assert isinstance(prediction["score"], float)
                assert validate(prediction, body["label_config"]) == []
    # The uploaded image got Gemini's box at the right place; the unreachable ones got empty drafts.
    first = client.post("/predict", json=FIXTURES[6]["body"]).json["results"][0]
    (region,) = first["result"]
    assert region["value"]["rectanglelabels"] == ["Car"]
    assert region["meta"]["source"] == "gemini"
    assert region["value"]["x"] == pytest.approx(10 / 64 * 100, abs=2.5)  # JPEG edges: about a pixel
    assert region["value"]["width"] == pytest.approx(32 / 64 * 100, abs=3.5)
    assert region["original_width"] == 64 and region["original_height"] == 48
    unreachable = client.post("/predict", json=FIXTURES[9]["body"]).json["results"]
    assert [p["result"] for p in unreachable] == [[], []]


def test_replay_with_yolo_only(client_for, checkpoint):
    client = client_for(None, yolo_model=str(checkpoint), yolo_score_threshold=0.0001, routing="yolo")
    version = setup_version(client)
    assert version == "yolo:custom-fallback"
    body = FIXTURES[6]["body"]
    (prediction,) = client.post("/predict", json=body).json["results"]
    assert prediction["model_version"] == version
    assert prediction["result"], "an untrained model at threshold 1e-4 still proposes boxes"
    assert all(r["meta"]["source"] == "yolo" for r in prediction["result"])
    assert all(r["value"]["rectanglelabels"][0] in ("Car", "Person") for r in prediction["result"])
    assert validate(prediction, body["label_config"]) == []


# --- routing and fallback -------------------------------------------------------------------------

def test_gemini_failure_falls_back_to_yolo_for_that_task(client_for, gemini, checkpoint):
    client = client_for(gemini, yolo_model=str(checkpoint), yolo_score_threshold=0.0001, gemini_task_deadline=1.0)
    gemini.script(fg.server_error(500), fg.server_error(500), fg.server_error(500), fg.server_error(500))
    body = copy.deepcopy(FIXTURES[6]["body"])
    (prediction,) = client.post("/predict", json=body).json["results"]
    gemini.clear()
    sources = {r["meta"]["source"] for r in prediction["result"]}
    assert sources == {"yolo"}
    assert prediction["model_version"] == "gemini:gemini-2.5-flash+yolo:custom-fallback" == setup_version(client)
    metrics = client.get("/metrics").data.decode()
    assert 'lsb_predictions_total{source="yolo"}' in metrics
    assert any(f'lsb_gemini_fallbacks_total{{reason="{reason}"}}' in metrics for reason in ("server_error", "deadline"))


def test_blocked_prompt_is_a_failure_not_an_empty_answer(client_for, gemini, checkpoint):
    client = client_for(gemini, yolo_model=str(checkpoint), yolo_score_threshold=0.0001)
    gemini.script(fg.blocked())
    (prediction,) = client.post("/predict", json=FIXTURES[6]["body"]).json["results"]
    assert prediction["result"] and {r["meta"]["source"] for r in prediction["result"]} == {"yolo"}


def test_real_empty_gemini_answer_is_not_a_fallback(client_for, gemini, checkpoint):
    client = client_for(gemini, yolo_model=str(checkpoint), yolo_score_threshold=0.0001)
    gemini.script(fg.ok("[]"))
    (prediction,) = client.post("/predict", json=FIXTURES[6]["body"]).json["results"]
    # score 1.0: PREDICTION_SCORE=usefulness, and YOLO never saw a task Gemini drafted (README, Most useful tasks first)
    assert prediction == {"result": [], "score": 1.0, "model_version": "gemini:gemini-2.5-flash+yolo:custom-fallback"}


def test_no_detector_gives_one_empty_prediction_per_task(client_for):
    client = client_for(None)
    body = FIXTURES[9]["body"]
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    assert response.json["results"] == [{"result": [], "score": 0.0, "model_version": "no-model"}] * 2
    assert setup_version(client) == "no-model"


def test_a_bad_image_fails_only_its_task(client_for, gemini, fake_ls):
    client = client_for(gemini)
    fake_ls.files["/data/upload/2/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    body = copy.deepcopy(FIXTURES[6]["body"])
    broken = copy.deepcopy(body["tasks"][0])
    broken["id"], broken["data"]["image"] = 99, "/data/upload/2/broken.jpg"
    body["tasks"] = [broken, body["tasks"][0]]
    results = client.post("/predict", json=body).json["results"]
    assert results[0]["result"] == []
    assert results[1]["result"][0]["value"]["rectanglelabels"] == ["Car"]


def test_interactive_text_prompt_goes_to_gemini_under_the_selected_label(client_for, gemini):
    client = client_for(gemini)
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
              '<Label value="Car"/><Label value="Person"/></RectangleLabels>'
              '<TextArea name="prompt" toName="image"/></View>')
    gemini.clear()
    gemini.script(fg.ok(json.dumps([{"box_2d": [100, 100, 600, 600], "label": "red things"}])))
    body = {
        "tasks": [{"id": 7, "data": {"image": UPLOAD}}],
        "project": "2.1", "label_config": config,
        "params": {"context": {"result": [
            {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["red things on grass"]}},
            {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "value": {"x": 1, "y": 1, "width": 1, "height": 1, "rectanglelabels": ["Person"]}},
        ]}},
    }
    response = client.post("/predict", json=body)
    (prediction,) = response.json["results"]
    assert isinstance(prediction, dict)
    assert [r["value"]["rectanglelabels"] for r in prediction["result"]] == [["Person"]]
    assert "red things on grass" in gemini.calls[-1].all_text
    assert validate(prediction, config) == []


def test_model_score_threshold_filters_yolo_regions(client_for, checkpoint):
    client = client_for(None, yolo_model=str(checkpoint), yolo_score_threshold=0.0001)
    body = copy.deepcopy(FIXTURES[6]["body"])
    body["label_config"] = body["label_config"].replace('toName="image">', 'toName="image" model_score_threshold="0.99">', 1)
    (prediction,) = client.post("/predict", json=body).json["results"]
    assert prediction["result"] == []


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
def test_non_json_body_is_a_400_with_a_message(client_for, path):
    client = client_for(None)
    response = client.post(path, data=b"not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json["message"]


@pytest.mark.parametrize("body,needle", [
    ({"label_config": "<View/>"}, "tasks"),
    ({"tasks": "x", "label_config": "<View/>"}, "tasks"),
    ({"tasks": [{"data": {}}]}, "label_config"),
    ({"tasks": [{"data": {"image": "x"}}], "label_config": "not xml", "project": "1.1"}, "XML"),
])
def test_malformed_predict_bodies(client_for, body, needle):
    response = client_for(None).post("/predict", json=body)
    assert response.status_code == 400
    assert needle.lower() in response.json["message"].lower()


def test_one_odd_task_gets_an_empty_prediction_and_the_batch_is_served(client_for, gemini):
    """Was a 400 for the whole batch (Label Studio then stores nothing for any task)."""
    client = client_for(gemini)
    body = copy.deepcopy(FIXTURES[6]["body"])
    good = body["tasks"][0]
    body["tasks"] = [{"id": 1, "data": None}, good, "not a task", {"id": 3, "data": {"image": ["a", "b"]}}]
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    first, served, second, third = response.json["results"]
    version = setup_version(client)
    assert first == {"result": [], "score": 0.0, "model_version": version, "reason": "task no_data"}
    assert second["reason"] == "task not_an_object" and third["reason"] == "task image_not_a_string"
    assert served["result"][0]["value"]["rectanglelabels"] == ["Car"] and "reason" not in served
    assert validate(served, body["label_config"]) == []


def test_setup_rejects_a_config_it_cannot_serve_and_names_what_it_supports(client_for):
    schema = '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
    response = client_for(None).post("/setup", json={"project": "3.1", "schema": schema})
    assert response.status_code == 400
    assert "RectangleLabels" in response.json["message"] and "Choices" in response.json["message"]


def test_unknown_keys_are_accepted(client_for, gemini):
    body = copy.deepcopy(FIXTURES[6]["body"])
    body["something_new"] = {"from": "a future Label Studio"}
    body["tasks"][0]["new_task_field"] = 1
    assert client_for(gemini).post("/predict", json=body).status_code == 200


def test_too_many_tasks_are_drafted_in_the_background(client_for, redis_url):
    client = client_for(None, predict_max_tasks=3)
    body = copy.deepcopy(FIXTURES[6]["body"])
    body["tasks"] = [dict(body["tasks"][0], id=i) for i in range(5)]
    response = client.post("/predict", json=body)
    assert response.status_code == 413
    assert "PREDICT_MAX_TASKS" in response.json["message"]
    assert Queue("prelabel", connection=redis.Redis.from_url(redis_url)).count >= 1


def prelabel_jobs(redis_url: str) -> list:
    queue = Queue("prelabel", connection=redis.Redis.from_url(redis_url))
    return [queue.fetch_job(job_id) for job_id in queue.job_ids]


def test_a_batch_too_slow_for_label_studio_is_drafted_in_the_background(client_for, redis_url, gemini):
    """Was: any batch up to PREDICT_MAX_TASKS inline; 200 tasks at 8 s a call outlived Label Studio's 100 s."""
    client = client_for(gemini, gemini_concurrency=16)
    gemini.clear()
    client.services.predictor.latency.observe("gemini", 8.0)  # what this process measured
    body = copy.deepcopy(FIXTURES[6]["body"])
    body["tasks"] = [dict(body["tasks"][0], id=i) for i in range(2000, 2200)]
    response = client.post("/predict", json=body)
    assert response.status_code == 413, response.json
    assert response.json["error"] == "too_slow_inline" and "104 s" in response.json["message"]
    (job,) = prelabel_jobs(redis_url)
    assert [t["id"] for t in job.args[1]] == list(range(2000, 2200)) and gemini.calls == []
    # the same process, the same latency: 16 tasks (one wave, 8 s) fit the 50 s budget and are answered
    body["tasks"] = body["tasks"][:16]
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and len(response.json["results"]) == 16


def test_an_inline_batch_past_its_deadline_is_answered_504_and_handed_to_the_job(client_for, redis_url, gemini):
    """Label Studio stores nothing for a non-200 answer: the job drafts every task, none twice."""
    client = client_for(gemini, gemini_task_deadline=10, gemini_timeout=10, predict_timeout=20,
                        predict_inline_share=1.0, predict_deadline_share=0.05)  # deadline 1 s
    gemini.clear()
    oracle, gemini.responder = gemini.responder, lambda request: fg.delayed(fg.ok("[]"), 3.0)
    try:
        body = copy.deepcopy(FIXTURES[6]["body"])
        body["tasks"] = [dict(body["tasks"][0], id=i) for i in range(1000, 1003)] + [{"id": 1099, "data": None}]
        response = client.post("/predict", json=body)
    finally:
        gemini.responder = oracle
    assert response.status_code == 504, response.json
    assert response.json["error"] == "deadline"
    (job,) = prelabel_jobs(redis_url)
    assert [t["id"] for t in job.args[1]] == [1000, 1001, 1002, 1099]


# --- auth -----------------------------------------------------------------------------------------

def test_basic_auth_guards_everything_but_health(client_for):
    client = client_for(None, basic_auth_user="ls", basic_auth_pass="pw-123456")
    assert client.get("/health").status_code == 200
    for method, path in (("post", "/setup"), ("post", "/predict"), ("get", "/versions"), ("get", "/metrics"),
                         ("get", "/train/status?project=1"), ("post", "/models/rollback")):
        assert getattr(client, method)(path, json={}).status_code == 401, path
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw-123456").decode()}
    setup = {"project": "2.1", "schema": FIXTURES[1]["body"]["schema"]}
    assert client.post("/setup", json=setup, headers=good).status_code == 200


def test_webhook_needs_the_secret(client_for):
    client = client_for(None, webhook_secret="hook-secret-42")
    event = {"action": "PROJECT_UPDATED", "project": {"id": 2}}
    assert client.post("/webhook", json=event).status_code == 401
    assert client.post("/webhook?token=wrong", json=event).status_code == 401
    assert client.post("/webhook?token=hook-secret-42", json=event).status_code == 200
    assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": "hook-secret-42"}).status_code == 200


def test_webhook_answers_503_fast_when_redis_is_down(client_for):
    client = client_for(None, redis_url="redis://127.0.0.1:1/0")
    event = {"action": "START_TRAINING", "project": {"id": 2}}
    response = client.post("/webhook", json=event)
    assert response.status_code == 503
    assert "Redis" in response.json["message"]


def test_webhook_rejects_malformed_events(client_for):
    client = client_for(None)
    assert client.post("/webhook", json={"no": "action"}).status_code == 400
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 400
    assert client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 2}, "tasks": "x"}).status_code == 400
    assert client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 2}}).json["status"] == "ignored"


def test_tasks_created_enqueues_a_prelabel_job(client_for, redis_url):
    client = client_for(None)
    event = next(r for r in FIXTURES if r["path"] == "/webhook" and r["body"]["action"] == "TASKS_CREATED")["body"]
    response = client.post("/webhook", json=event)
    assert response.status_code == 200 and response.json["prelabel_job"]
    job = Queue("prelabel", connection=redis.Redis.from_url(redis_url)).fetch_job(response.json["prelabel_job"])
    assert job.args[0] == "2" and job.args[1][0]["data"]["image"] == "https://example.com/b.jpg"


def test_prelabel_status_shows_an_import_the_policy_skipped(client_for, redis_url):
    client = client_for(None, webhook_secret="hook-secret-42", prelabel_on_import="none")
    project = 90_000_000 + uuid.uuid4().int % 9_000_000
    event = {"action": "TASKS_CREATED", "project": {"id": project},
             "tasks": [{"id": i, "data": {"image": f"https://example.com/{i}.jpg"}} for i in (1, 2, 3)]}
    try:
        answer = client.post("/webhook?token=hook-secret-42", json=event).json
        assert answer["prelabel_job"] is None and answer["policy"]["skipped_by_policy"] == 3
        assert client.get(f"/prelabel/status?project={project}").status_code == 401
        status = client.get(f"/prelabel/status?project={project}", headers={"X-Webhook-Secret": "hook-secret-42"}).json
        assert (status["imported"], status["skipped_policy"], status["queued"]) == (3, 3, 0)
        assert status["last_import"]["policy"] == "none" and status["last_import"]["source"] == "deployment"
    finally:
        store = redis.Redis.from_url(redis_url)
        for pattern in keys.project_patterns(project):
            for key in store.scan_iter(pattern):
                store.delete(key)


def test_404_and_405_are_json(client_for):
    client = client_for(None)
    assert client.get("/nope").status_code == 404 and client.get("/nope").json["error"]
    assert client.get("/predict").status_code == 405


def test_state_changing_routes_are_closed_when_only_the_webhook_secret_is_set(client_for):
    client = client_for(None, webhook_secret="hook-secret-42")
    for path in ("/train?project=4", "/prelabel?project=4", "/models/rollback"):
        assert client.post(path, json={"project": 4}).status_code == 401, path
    assert client.post("/train?project=4&token=hook-secret-42").status_code == 202


def test_start_training_from_label_studio_is_accepted_with_basic_auth(client_for):
    client = client_for(None, webhook_secret="hook-secret-42", basic_auth_user="ls", basic_auth_pass="pw-123456")
    event = {"action": "START_TRAINING", "project": {"id": 4}}
    assert client.post("/webhook", json=event).status_code == 401
    basic = {"Authorization": "Basic " + base64.b64encode(b"ls:pw-123456").decode()}
    assert client.post("/webhook", json=event, headers=basic).status_code == 201


def test_model_path_attribute_serves_a_checkpoint_inside_model_dir_only(client_for, tmp_path, checkpoint):
    (tmp_path / "models" / "custom").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "models" / "custom" / "site.pt")
    client = client_for(None, yolo_score_threshold=0.0001)
    body = copy.deepcopy(FIXTURES[6]["body"])
    body["label_config"] = body["label_config"].replace('toName="image">', 'toName="image" model_path="custom/site.pt">', 1)
    version = setup_version(client, schema=body["label_config"])
    assert version == "yolo:path-custom-site"
    (prediction,) = client.post("/predict", json=body).json["results"]
    assert prediction["model_version"] == version and prediction["result"]
    for outside in ("../../etc/passwd", "/etc/passwd", str(checkpoint)):
        bad = body["label_config"].replace('model_path="custom/site.pt"', f'model_path="{outside}"')
        assert client.post("/setup", json={"project": "2.1", "schema": bad}).status_code == 400
        response = client.post("/predict", json=dict(body, label_config=bad))
        assert response.status_code == 400 and "MODEL_DIR" in response.json["message"]
