"""Hand-written hostile requests: each is rejected with a 4xx JSON message, or handled, and nothing is
stored or queued that should not be.

Regression cases for bugs this suite found are marked "was a 500".
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rq import Queue

from backend.core.metrics import PREDICTION_FAILURES
from tests import fake_gemini as fg
from tests.adversarial import CAR_BOX, CONFIG, PROJECT, RED, assert_box, car_picture, encode, predict_body, task

NO_IMAGE_CONFIG = ('<View><Text name="text" value="$text"/><RectangleLabels name="label" toName="text">'
                   '<Label value="Car"/></RectangleLabels></View>')


@pytest.fixture
def redis_db(private_redis):
    client = private_redis.client()
    client.flushall()
    yield client
    client.flushall()


@pytest.fixture
def handle(app_factory, private_redis, redis_db):
    return app_factory(private_redis.url)


def rejected(response, status: int = 400, needle: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.get_data()[:300])
    assert response.mimetype == "application/json"
    body = response.json
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"].strip()
    if needle is not None:
        assert needle.lower() in body["message"].lower(), body
    return body


def queued_jobs(redis_db) -> dict[str, list[str]]:
    return {name: Queue(name, connection=redis_db).job_ids for name in ("training", "prelabel")}


# --- bodies that are not JSON objects ----------------------------------------------------------------

NOT_JSON = [
    pytest.param(b"not json", "application/json", id="garbage"),
    pytest.param(b'{"tasks": [', "application/json", id="truncated"),
    pytest.param(b"\xff\xfe\x00\x01", "application/json", id="binary"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b'{"action": "START_TRAINING", "project": 2}', "text/plain", id="json-as-text-plain"),
    pytest.param(b"[1, 2]", "application/json", id="array"),
    pytest.param(b'"a string"', "application/json", id="string"),
    pytest.param(b"null", "application/json", id="null"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "application/json", id="nested-100k-was-a-500"),
    pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json", id="nested-objects-was-a-500"),
]


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize("data,content_type", NOT_JSON)
def test_non_json_bodies_are_a_400_naming_json(handle, redis_db, path, data, content_type):
    rejected(handle.client.post(path, data=data, content_type=content_type), 400, "JSON")
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}


@pytest.mark.parametrize("path", ["/train", "/prelabel", "/models/rollback"])
@pytest.mark.parametrize("data", [b"[1, 2]", b'"2"', b"not json", b"[" * 100_000 + b"]" * 100_000],
                         ids=["array-was-a-500", "string", "garbage", "nested"])
def test_training_routes_need_a_project_whatever_the_body(handle, redis_db, path, data):
    body = rejected(handle.client.post(path, data=data, content_type="application/json"), 400)
    assert "project" in body["message"] or (path == "/models/rollback" and "JSON object" in body["message"]), body
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}


# --- wrong types and missing fields ------------------------------------------------------------------

GOOD_TASKS = [task(1, "/data/upload/7/a.png")]


@pytest.mark.parametrize("body,needle", [
    ({"label_config": CONFIG, "project": PROJECT}, "tasks"),
    ({"tasks": None, "label_config": CONFIG, "project": PROJECT}, "tasks"),
    ({"tasks": [], "label_config": CONFIG, "project": PROJECT}, "tasks"),
    ({"tasks": {"id": 1}, "label_config": CONFIG, "project": PROJECT}, "tasks"),
    ({"tasks": "1,2,3", "label_config": CONFIG, "project": PROJECT}, "tasks"),
    ({"tasks": 3, "label_config": CONFIG, "project": PROJECT}, "tasks"),
    ({"tasks": GOOD_TASKS, "project": PROJECT}, "label_config"),
    ({"tasks": GOOD_TASKS, "label_config": 5, "project": PROJECT}, "label_config"),
    ({"tasks": GOOD_TASKS, "label_config": ["<View/>"], "project": PROJECT}, "label_config"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": "abc"}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": -1}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": {"id": 7}}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": [7]}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": True}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": "../../etc"}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": "²"}, "project"),
    ({"tasks": GOOD_TASKS, "label_config": CONFIG, "project": "9" * 400}, "project"),
])
def test_wrong_types_and_missing_fields_on_predict(handle, redis_db, body, needle):
    rejected(handle.client.post("/predict", json=body), 400, needle)
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}


ODD_TASKS = [  # (task, the reason code its empty prediction carries)
    (1, "task not_an_object"),
    (None, "task not_an_object"),
    ("task", "task not_an_object"),
    ([{"id": 3}], "task not_an_object"),
    ({"id": 4}, "task no_data"),
    ({"id": 5, "data": None}, "task no_data"),
    ({"id": 6, "data": "x"}, "task data_not_an_object"),
    ({"id": 7, "data": [1]}, "task data_not_an_object"),
    ({"id": 8, "data": {"image": 5}}, "task image_not_a_string"),
    ({"id": 9, "data": {"image": {"url": "/data/upload/7/a.png"}}}, "task image_not_a_string"),
    ({"id": 10, "data": {"image": None}}, "no image url"),
    ({"id": 11, "data": {"other": "/data/upload/7/a.png"}}, "no image url"),
]


def test_odd_tasks_get_an_empty_prediction_with_a_reason_and_the_rest_are_served(handle, redis_db, caplog):
    """Was a 400 for the whole batch: one odd task cost every task its draft."""
    def failures(reason: str) -> float:
        return PREDICTION_FAILURES.labels(reason)._value.get()

    good = task(1, "data:image/png;base64,bm90IGFuIGltYWdl")  # a string URL: routed (and failing on its own)
    tasks = [good] + [t for t, _ in ODD_TASKS] + [task(2, "/data/upload/7/b.png")]
    before = {reason: failures(reason) for _, reason in ODD_TASKS}
    response = handle.client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200, response.get_data()[:300]
    results = response.json["results"]
    assert len(results) == len(tasks)
    for (odd, reason), prediction in zip(ODD_TASKS, results[1:-1]):
        assert prediction == {"result": [], "score": 0.0, "model_version": "no-model", "reason": reason}, odd
    assert "reason" not in results[0] and "reason" not in results[-1]  # routed: failed on their image, not their shape
    counted = {reason: failures(reason) - before[reason] for reason in before}
    assert counted == {reason: sum(r == reason for _, r in ODD_TASKS) for reason in before}
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}


def test_odd_tasks_beside_a_good_one_do_not_cost_it_its_draft(app_factory, private_redis, redis_db):
    url = "data:image/png;base64," + base64.b64encode(encode(car_picture())).decode()
    with fg.FakeGemini(responder=fg.Oracle(colors={"Car": RED})) as gemini:
        handle = app_factory(private_redis.url, gemini=gemini)
        tasks = [t for t, _ in ODD_TASKS[:6]] + [task(1, url)]
        response = handle.client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200, response.get_data()[:300]
    *odd, good = response.json["results"]
    assert [p["reason"] for p in odd] == [r for _, r in ODD_TASKS[:6]]
    (region,) = good["result"]
    assert_box(region, CAR_BOX, 64, 48)
    assert len(gemini.calls) == 1, "only the good task reaches Gemini"


@pytest.mark.parametrize("body,needle", [
    ({"project": "7.1"}, "schema"),
    ({"project": "7.1", "schema": 5}, "schema"),
    ({"project": "7.1", "schema": None}, "schema"),
    ({"schema": CONFIG}, "project"),
    ({"schema": CONFIG, "project": "x.1"}, "project"),
])
def test_wrong_types_and_missing_fields_on_setup(handle, body, needle):
    rejected(handle.client.post("/setup", json=body), 400, needle)


@pytest.mark.parametrize("path", ["/models", "/train/status"])
@pytest.mark.parametrize("project", ["", "x", "-3", "1" * 300, "1" * 5000, "١٢", "7/../../etc"],
                         ids=["empty", "letters", "negative", "300-digits", "5000-digits-was-a-500", "arabic-digits",
                              "traversal"])
def test_bad_project_ids_in_queries(handle, tmp_path, path, project):
    rejected(handle.client.get(path, query_string={"project": project}), 400, "project")


@pytest.mark.parametrize("version", [5, ["v0001"], {"v": 1}, True], ids=["int-was-a-500", "list-was-a-500", "dict", "bool"])
def test_rollback_version_must_be_a_string(handle, version):
    rejected(handle.client.post("/models/rollback", json={"project": 7, "version": version}), 400, "version")


@pytest.mark.parametrize("version", ["../../etc", "v0001/../../x", "v9999", "current.json"])
def test_rollback_to_a_version_that_is_not_there_is_404(handle, version):
    rejected(handle.client.post("/models/rollback", json={"project": 7, "version": version}), 404)


# --- too many tasks, too large a body --------------------------------------------------------------

def test_ten_thousand_tasks_are_413_and_drafted_in_the_background(handle, redis_db, monkeypatch):
    def must_not_predict(*args, **kwargs):
        raise AssertionError("an oversized batch must not be predicted inline")

    monkeypatch.setattr(handle.services.predictor, "predict", must_not_predict)
    tasks = [task(i, f"/data/upload/7/img-{i}.png") for i in range(10_000)]
    started = time.perf_counter()
    response = handle.client.post("/predict", json=predict_body(tasks))
    took = time.perf_counter() - started
    body = rejected(response, 413)
    assert body["error"] == "too_many_tasks"
    (job_id,) = Queue("prelabel", connection=redis_db).job_ids
    assert body["message"] == (f"10000 tasks exceed PREDICT_MAX_TASKS={handle.settings.predict_max_tasks}; drafting them "
                               f"in the background (job {job_id}); predictions appear as they are stored")
    job = Queue("prelabel", connection=redis_db).fetch_job(job_id)
    assert job.func_name == "worker.jobs.prelabeling.prelabel_tasks"
    project, stored_tasks, config = job.args
    assert project == "7" and config == CONFIG
    assert [t["id"] for t in stored_tasks] == list(range(10_000))  # every task, in order, none lost
    assert stored_tasks[9_999] == {"id": 9_999, "data": {"image": "/data/upload/7/img-9999.png"}}
    assert job.timeout >= 600
    assert queued_jobs(redis_db)["training"] == []
    assert took < 10, f"answered in {took:.1f} s; Label Studio waits 100 s, but this must be quick"


def test_a_50_mb_body_is_413_with_a_message_before_it_is_read(handle, redis_db, monkeypatch):
    reads = []
    body = b'{"tasks": [' + b" " * (50 * 1024 * 1024) + b"]}"

    class CountingStream(io.BytesIO):
        def read(self, *args):
            chunk = super().read(*args)
            reads.append(len(chunk))
            return chunk

    for path in ("/predict", "/webhook", "/setup"):
        reads.clear()
        started = time.perf_counter()
        response = handle.client.post(path, input_stream=CountingStream(body), content_length=len(body),
                                      content_type="application/json")
        took = time.perf_counter() - started
        payload = rejected(response, 413)
        assert payload["error"] == "request_entity_too_large" and "exceeds the capacity limit" in payload["message"]
        assert sum(reads) == 0, "the body was read despite its Content-Length"
        assert took < 1.0, took
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}


@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup", "/train"])
def test_a_chunked_body_over_the_limit_is_413_having_read_no_more_than_the_limit(handle, redis_db, path):
    """No Content-Length (chunked; gunicorn sets wsgi.input_terminated): werkzeug stops reading at
    MAX_REQUEST_MB and the app answers 413 (it was a 400 "not JSON": the cut body was parsed)."""
    limit = handle.settings.max_request_mb * 1024 * 1024
    reads = []

    class CountingStream(io.BytesIO):
        def readinto(self, buffer):
            n = super().readinto(buffer)
            reads.append(n)
            return n

        def read(self, *args):
            chunk = super().read(*args)
            reads.append(len(chunk))
            return chunk

    stream = CountingStream(b'{"tasks": [' + b" " * (3 * limit) + b"]}")
    response = handle.client.post(path, input_stream=stream, content_type="application/json",
                                  environ_overrides={"wsgi.input_terminated": True}, headers={"Transfer-Encoding": "chunked"})
    assert rejected(response, 413)["error"] == "request_entity_too_large"
    assert sum(reads) <= limit + 64 * 1024, sum(reads)
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}


def test_a_chunked_body_under_the_limit_is_served(handle):
    body = json.dumps(predict_body(GOOD_TASKS)).encode()
    response = handle.client.post("/predict", input_stream=io.BytesIO(body), content_type="application/json",
                                  environ_overrides={"wsgi.input_terminated": True}, headers={"Transfer-Encoding": "chunked"})
    assert response.status_code == 200 and len(response.json["results"]) == 1


# --- webhooks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["PROJECT_UPDATED", "SOMETHING_NEW", "annotation_created", "START_TRAINING ",
                                    "ANNOTATION_CREATED\x00", "ÄNNOTATION", "x" * 10_000])
def test_unknown_actions_are_answered_200_and_ignored(handle, redis_db, action):
    response = handle.client.post("/webhook", json={"action": action, "project": {"id": 7}, "annotation": {"id": 1}})
    assert response.status_code == 200
    assert response.json == {"status": "ignored", "action": action}
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}
    assert not list(redis_db.scan_iter("lsb:train:*"))


def test_project_deleted_schedules_a_cleanup_and_queues_nothing(handle, redis_db):
    """Was ignored (models, datasets and keys of a deleted project stayed forever): README, project lifecycle."""
    response = handle.client.post("/webhook", json={"action": "PROJECT_DELETED", "project": {"id": 7}})
    assert response.status_code == 200 and response.json["status"] == "deleted"
    assert response.json["cleanup_in_hours"] == handle.settings.project_delete_grace_hours > 0
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}  # scheduled for later, not queued
    again = handle.client.post("/webhook", json={"action": "PROJECT_DELETED", "project": 7})
    assert again.json["status"] == "already_deleted" and again.json["cleanup_job"] == response.json["cleanup_job"]


@pytest.mark.parametrize("event,needle", [
    ({"project": {"id": 7}}, "action"),
    ({"action": "", "project": {"id": 7}}, "action"),
    ({"action": 5, "project": {"id": 7}}, "action"),
    ({"action": ["START_TRAINING"], "project": {"id": 7}}, "action"),
    ({"action": "START_TRAINING"}, "project"),
    ({"action": "START_TRAINING", "project": {"id": "seven"}}, "project"),
    ({"action": "START_TRAINING", "project": {"title": "no id"}}, "project"),
    ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, "project"),
    ({"action": "ANNOTATION_CREATED", "project": 7, "annotation": [1]}, "annotation"),
    ({"action": "TASKS_CREATED", "project": {"id": 7}, "tasks": "1,2"}, "tasks"),
    ({"action": "TASKS_CREATED", "project": {"id": 7}, "tasks": [1, 2]}, "tasks"),
])
def test_known_actions_with_broken_payloads_are_400_and_store_nothing(handle, redis_db, event, needle):
    rejected(handle.client.post("/webhook", json=event), 400, needle)
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}
    assert not list(redis_db.scan_iter("lsb:train:*"))


def test_a_skipped_task_is_not_counted(handle, redis_db):
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"id": 1, "was_cancelled": True}}
    response = handle.client.post("/webhook", json=event)
    assert response.status_code == 200 and response.json["status"] == "ignored"
    assert redis_db.get("lsb:train:7:events") is None


# --- label configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["not xml", "<View>", "<View><Image name='i' value='$i'></View>", '{"View": {}}',
                                    "<?xml version='1.0'?>", "\x00\x01", "<View/>" * 3],
                         ids=["text", "unclosed", "mismatched", "json", "declaration-only", "binary", "three-roots"])
def test_a_label_config_that_is_not_xml(handle, config):
    for response in (handle.client.post("/setup", json={"project": PROJECT, "schema": config}),
                     handle.client.post("/predict", json=predict_body(GOOD_TASKS, config=config))):
        rejected(response, 400, "label config")


@pytest.mark.parametrize("config", ["", "   \n "], ids=["empty", "blank"])
def test_an_empty_label_config(handle, config):
    rejected(handle.client.post("/setup", json={"project": PROJECT, "schema": config}), 400, "empty label config")


def test_a_config_with_no_image_object(handle):
    for response in (handle.client.post("/setup", json={"project": PROJECT, "schema": NO_IMAGE_CONFIG}),
                     handle.client.post("/predict", json=predict_body(GOOD_TASKS, config=NO_IMAGE_CONFIG))):
        body = rejected(response, 400, "no <Image> object")
        assert "RectangleLabels" in body["message"]


def test_a_config_with_an_image_but_nothing_this_backend_predicts(handle):
    config = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>'
    body = rejected(handle.client.post("/setup", json={"project": PROJECT, "schema": config}), 400, "Choices")
    assert "RectangleLabels, BrushLabels or PolygonLabels" in body["message"]


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012 - reset per test by the fixture

    def do_GET(self):
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'<!ENTITY x "pwned">')

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    _Recorder.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.hits
    server.shutdown()
    server.server_close()


def _xml_attacks(url: str) -> dict[str, str]:
    body = ('<View><Image name="image" value="$image"/>'
            '<RectangleLabels name="l" toName="image"><Label value="{}"/></RectangleLabels></View>')
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    return {
        "billion-laughs": f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY l0 "lol">{entities}]>' + body.format("&l9;"),
        "xxe-file": '<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + body.format("&x;"),
        "xxe-http": f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "{url}/xxe">]>' + body.format("&x;"),
        "external-dtd": f'<?xml version="1.0"?><!DOCTYPE View SYSTEM "{url}/dtd">' + body.format("&x;"),
        "parameter-entity": f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY % p SYSTEM "{url}/param"> %p;]>' + body.format("a"),
    }


@pytest.mark.parametrize("name", ["billion-laughs", "xxe-file", "xxe-http", "external-dtd", "parameter-entity"])
def test_xml_attacks_in_the_label_config_read_and_fetch_nothing(handle, recorder, name):
    url, hits = recorder
    config = _xml_attacks(url)[name]
    started = time.perf_counter()
    for response in (handle.client.post("/setup", json={"project": PROJECT, "schema": config}),
                     handle.client.post("/predict", json=predict_body(GOOD_TASKS, config=config))):
        text = response.get_data(as_text=True)
        assert "root:" not in text and "pwned" not in text and "lollollol" not in text
        if response.status_code != 400:
            # parsed with the entity left unexpanded: served like any config, nothing resolved
            assert response.status_code == 200, text
    assert time.perf_counter() - started < 5
    assert hits == [], "the XML parser fetched an external entity or DTD"


# --- routing and methods ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,status", [
    ("GET", "/nope", 404), ("GET", "/../../etc/passwd", 404), ("GET", "/predict", 405), ("PUT", "/predict", 405),
    ("DELETE", "/models", 405), ("PATCH", "/webhook", 405), ("POST", "/health", 405), ("GET", "/%00", 404),
    ("GET", "/models/rollback", 405), ("POST", "/versions", 405),
])
def test_unknown_routes_and_methods_are_json(handle, method, path, status):
    rejected(handle.client.open(path, method=method), status)


def test_unknown_keys_and_huge_strings_in_a_valid_body_are_served(handle):
    body = predict_body([{**task(1, "x" * 100_000), "meta": {"nested": [[[]]]}, "future": True}])
    body["something_from_a_future_label_studio"] = {"deep": list(range(1000))}
    response = handle.client.post("/predict", json=body)
    assert response.status_code == 200
    (prediction,) = response.json["results"]
    assert prediction["result"] == [] and prediction["model_version"] == "no-model"
    assert json.dumps(response.json).count("x" * 100) == 0, "the bad URL is not echoed back"


@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup", "/train"])
def test_a_body_that_would_parse_to_gigabytes_is_413_before_parsing(app_factory, private_redis, redis_db, path, monkeypatch):
    """4 MB of ``{},`` under an 8 MB MAX_REQUEST_MB: json.loads would allocate about 100 MB, more than
    8x the limit allows, so the body is refused unparsed (a spy on json.loads sees no call)."""
    handle = app_factory(private_redis.url, max_request_mb=8)
    calls = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: calls.append(1) or real_loads(*a, **k))
    n = 1_400_000
    body = b'{"project": 1, "tasks": [' + b"{}," * (n - 1) + b"{}]}"
    response = handle.client.post(path, data=body, content_type="application/json")
    assert calls == [], "the body was parsed"
    payload = rejected(response, 413, needle="memory")
    assert payload["error"] == "request_entity_too_large"
    assert queued_jobs(redis_db) == {"training": [], "prelabel": []}
    # The same body with the braces inside one string costs what it weighs: parsed and answered.
    flat = json.dumps({"project": 1, "tasks": [], "note": "x" * len(body)}).encode()
    assert handle.client.post(path, data=flat, content_type="application/json").status_code != 413
