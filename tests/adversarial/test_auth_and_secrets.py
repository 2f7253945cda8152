"""Who may call what, and no secret in any log.

- Basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) guards every route of the OpenAPI description except
  the open ones (/health, /openapi.json); the routes that change state (/webhook, /train, /prelabel,
  /models/rollback) take the shared secret (header X-Webhook-Secret or ?token=) or Basic auth.
  Malformed credentials are a 401, never a 500.
- Comparisons are constant-time: every check goes through ``hmac.compare_digest``, and the user and
  the password are both compared even when the user is already wrong (no early exit to time).
- The real deployment (gunicorn + an ``rq worker``) with every secret set, driven through all routes,
  including failing ones (a Gemini key the API refuses, Label Studio going down mid-way, jobs failing
  in the worker): the captured output of both processes contains none of the secrets.
(Unit cases of backend.web.auth and backend.core.logs are in tests/backend/web/test_auth.py and tests/backend/core/test_logs.py.)
"""

from __future__ import annotations

import base64
import hmac
import time

import pytest
import requests
from rq.job import Job

from backend.core.settings import Settings
from backend.web import auth
from backend.web.auth import STATE_ROUTES
from backend.web.openapi import build_spec
from tests import fake_gemini as fg
from tests.adversarial import CONFIG, PROJECT, car_picture, encode, predict_body, task
from tests.fake_label_studio import FakeLabelStudio
from tests.live import base_env, gunicorn, rq_worker, wait_for

USER, PASSWORD, HOOK = "ls-backend", "basic-pass-Zq8#x1!9", "hook-secret-7Hc2kP0w"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


GOOD_AUTH = basic(USER, PASSWORD)


@pytest.fixture
def guarded(app_factory, private_redis):
    private_redis.client().flushall()
    handle = app_factory(private_redis.url, basic_auth_user=USER, basic_auth_pass=PASSWORD, webhook_secret=HOOK)
    yield handle
    private_redis.client().flushall()


def operations(settings) -> list[tuple[str, str, bool]]:
    spec = build_spec(settings)
    return [(path, method, op.get("security", spec["security"]) == [])
            for path, item in spec["paths"].items() for method, op in item.items()]


BAD_CREDENTIALS = {
    "none": {},
    "wrong-password": basic(USER, PASSWORD + "x"),
    "password-prefix": basic(USER, PASSWORD[:-1]),
    "wrong-user": basic("admin", PASSWORD),
    "empty": basic("", ""),
    "swapped": basic(PASSWORD, USER),
    "case": basic(USER.upper(), PASSWORD.upper()),
    "scheme-only": {"Authorization": "Basic"},
    "not-base64": {"Authorization": "Basic !!!%%%"},
    "no-colon": {"Authorization": "Basic " + base64.b64encode(USER.encode() + PASSWORD.encode()).decode()},
    "not-utf8": {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()},
    "bearer": {"Authorization": f"Bearer {PASSWORD}"},
    "token": {"Authorization": f"Token {PASSWORD}"},
    "huge": basic(USER, "p" * 6000),
    "unicode": basic("lß-backend", "päss"),
    "webhook-secret-as-password": basic(USER, HOOK),
}


@pytest.mark.parametrize("name", sorted(BAD_CREDENTIALS))
def test_every_route_but_the_open_ones_needs_basic_auth(guarded, name):
    client = guarded.client
    for path, method, is_open in operations(guarded.settings):
        response = client.open(path, method=method.upper(), headers=BAD_CREDENTIALS[name], json={})
        if is_open:
            assert response.status_code == 200, (path, name)
            continue
        assert response.status_code == 401, (path, method, name, response.status_code)
        assert response.json == {"error": "unauthorized", "message": "missing or wrong credentials"}
        if path != "/webhook":
            assert response.headers["WWW-Authenticate"] == 'Basic realm="ml-backend"'


def test_the_right_credentials_open_every_route(guarded):
    for path, method, _ in operations(guarded.settings):
        response = guarded.client.open(path, method=method.upper(), headers=GOOD_AUTH, json={"project": 7},
                                       query_string={"project": "7"})
        assert response.status_code not in (401, 403), (path, method)
        assert response.status_code < 500, (path, method, response.get_data())


@pytest.mark.parametrize("how,kwargs,ok", [
    ("header", {"headers": {"X-Webhook-Secret": HOOK}}, True),
    ("query", {"query_string": {"token": HOOK}}, True),
    ("basic-auth", {"headers": GOOD_AUTH}, True),
    ("nothing", {}, False),
    ("empty-header", {"headers": {"X-Webhook-Secret": ""}}, False),
    ("prefix", {"headers": {"X-Webhook-Secret": HOOK[:-1]}}, False),
    ("longer", {"headers": {"X-Webhook-Secret": HOOK + "0"}}, False),
    ("padded", {"headers": {"X-Webhook-Secret": f" {HOOK} "}}, False),
    ("upper", {"headers": {"X-Webhook-Secret": HOOK.upper()}}, False),
    ("other-header", {"headers": {"X-Secret": HOOK}}, False),
    ("as-bearer", {"headers": {"Authorization": f"Bearer {HOOK}"}}, False),
    ("wrong-token", {"query_string": {"token": "x"}}, False),
    ("token-in-body", {"json_extra": {"token": HOOK}}, False),
    ("wrong-header-right-basic", {"headers": {"X-Webhook-Secret": "x", **GOOD_AUTH}}, True),
    ("wrong-header-wrong-basic", {"headers": {"X-Webhook-Secret": "x", **basic(USER, "x")}}, False),
])
def test_webhook_secret(guarded, how, kwargs, ok):
    event = {"action": "PROJECT_UPDATED", "project": {"id": 7}, **kwargs.pop("json_extra", {})}
    response = guarded.client.post("/webhook", json=event, **kwargs)
    if ok:
        assert response.status_code == 200 and response.json == {"status": "ignored", "action": "PROJECT_UPDATED"}
    else:
        assert response.status_code == 401 and "WWW-Authenticate" not in response.headers


@pytest.mark.parametrize("path", ["/train", "/prelabel", "/models/rollback"])
def test_state_changing_routes_take_the_secret_too(guarded, path):
    client = guarded.client
    for kwargs in ({"headers": {"X-Webhook-Secret": HOOK}}, {"query_string": {"token": HOOK, "project": "7"}},
                   {"headers": GOOD_AUTH}):
        kwargs.setdefault("query_string", {"project": "7"})
        assert client.post(path, json={"project": 7}, **kwargs).status_code in (202, 404), (path, kwargs)
    for kwargs in ({}, {"headers": {"X-Webhook-Secret": HOOK[:-1]}}, {"query_string": {"token": "x", "project": "7"}},
                   {"headers": basic(USER, HOOK)}):
        response = client.post(path, json={"project": 7}, **kwargs)
        assert response.status_code == 401 and response.json["error"] == "unauthorized", (path, kwargs)


def test_every_check_is_constant_time_and_compares_user_and_password(guarded, monkeypatch):
    """All secret comparisons go through hmac.compare_digest, on bytes, both halves every time."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for path, method, is_open in operations(guarded.settings):
        if is_open:
            continue
        for headers, expected in ((basic("intruder", "guess"), [(b"intruder", USER.encode()), (b"guess", PASSWORD.encode())]),
                                  (basic(USER, "guess"), [(USER.encode(), USER.encode()), (b"guess", PASSWORD.encode())])):
            calls.clear()
            assert guarded.client.open(path, method=method.upper(), headers=headers).status_code == 401
            if path in STATE_ROUTES:  # the secret first (missing: compared as ""), then Basic auth
                assert calls[0] == (b"", HOOK.encode()) and calls[1:] == expected, calls
            else:
                assert calls == expected, (path, calls)


# --- the real deployment: no secret in any log ------------------------------------------------------

SECRETS = {
    "GEMINI_API_KEY": "AIzaSy-adversarial-gemini-key-0123456789",
    "BASIC_AUTH_PASS": PASSWORD,
    "WEBHOOK_SECRET": HOOK,
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, private_redis):
    """gunicorn (1 worker) + an rq worker on the private Redis, every secret set, LOG_LEVEL=DEBUG."""
    tmp = tmp_path_factory.mktemp("deploy")
    redis = private_redis.client()
    redis.flushall()
    ls = FakeLabelStudio().start()
    ls.files["/data/upload/7/car.png"] = encode(car_picture())
    ls.add_project(CONFIG, project_id=7)
    gemini = fg.FakeGemini().start()  # expects fg.DEFAULT_KEY: ours is refused with 400 INVALID_ARGUMENT
    env = base_env(
        REDIS_URL=private_redis.url, MODEL_DIR=tmp / "models", DATA_DIR=tmp / "data", LOG_LEVEL="DEBUG",
        LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat, GEMINI_BASE_URL=gemini.base_url,
        GEMINI_TIMEOUT=3, GEMINI_TASK_DEADLINE=6, BASIC_AUTH_USER=USER, TRAIN_MIN_NEW_ANNOTATIONS=1,
        LSB_TRAIN_RETRY_INTERVALS="1", **SECRETS,
    )
    logs = {"gunicorn": tmp / "gunicorn.log", "worker": tmp / "worker.log"}
    try:
        with (gunicorn(env, logs["gunicorn"], workers=1, threads=4) as url,
              rq_worker(env, ["training", "prelabel"], logs["worker"])):
            yield {"url": url, "ls": ls, "gemini": gemini, "redis": redis, "logs": logs}
    finally:
        ls.stop()
        gemini.stop()


def _jobs_done(redis, ids: list[str]) -> bool:
    return all(Job.fetch(i, connection=redis).get_status() in ("finished", "failed", "scheduled") for i in ids)


def test_no_secret_reaches_the_logs_of_gunicorn_or_the_worker(deployment):
    url, ls, redis, logs = deployment["url"], deployment["ls"], deployment["redis"], deployment["logs"]
    s = requests.Session()
    hook = {"X-Webhook-Secret": HOOK}
    body = predict_body([task(1, "/data/upload/7/car.png"), task(2, "/data/upload/7/missing.png")])

    # open routes, then every protected route with an attacker's wrong password
    assert s.get(f"{url}/health", timeout=5).json()["status"] == "UP"
    assert s.get(f"{url}/openapi.json", timeout=5).status_code == 200
    for path, method, is_open in operations(Settings()):
        if not is_open:
            r = s.request(method, f"{url}{path}", headers=basic(USER, PASSWORD[:-2] + "??"), json={}, timeout=5)
            assert r.status_code == 401, path
    assert s.post(f"{url}/webhook?token={HOOK[:-3]}xyz", json={"action": "X"}, timeout=5).status_code == 401

    # Label Studio up: the PAT is exchanged, the image fetched; Gemini refuses our key (400) -> no model -> empty
    assert s.post(f"{url}/setup", json={"project": PROJECT, "schema": CONFIG}, headers=GOOD_AUTH, timeout=10).status_code == 200
    r = s.post(f"{url}/predict", json=body, headers=GOOD_AUTH, timeout=60)
    assert r.status_code == 200 and [p["result"] for p in r.json()["results"]] == [[], []]
    assert deployment["gemini"].calls and deployment["gemini"].calls[-1].status == 400
    assert ls.refresh_count >= 1

    # webhooks with the secret (header and ?token=), jobs for the worker
    prelabel = s.post(f"{url}/webhook", headers=hook, timeout=5, json={
        "action": "TASKS_CREATED", "project": {"id": 7, "label_config": CONFIG}, "tasks": [task(1, "/data/upload/7/car.png")]})
    assert prelabel.status_code == 200, prelabel.text
    counted = s.post(f"{url}/webhook?token={HOOK}", timeout=5, json={"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                                                        "annotation": {"id": 1, "result": []}})
    assert counted.status_code == 200 and counted.json()["requested"] is True
    trained = s.post(f"{url}/train?project=7", headers=GOOD_AUTH, timeout=5)
    assert trained.status_code == 202
    job_ids = [prelabel.json()["prelabel_job"], trained.json()["job_id"]]
    assert wait_for(lambda: _jobs_done(redis, job_ids), timeout=90), [
        Job.fetch(i, connection=redis).get_status() for i in job_ids]

    # Label Studio goes down: predictions fail per task, trainings fail in the worker and are retried
    ls.stop()
    r = s.post(f"{url}/predict", json=body, headers=GOOD_AUTH, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    started = s.post(f"{url}/webhook", headers=hook, timeout=5, json={"action": "START_TRAINING", "project": {"id": 7}})
    assert started.status_code == 201
    down_job = started.json()["job_id"]
    assert wait_for(lambda: "unreachable" in (Job.fetch(down_job, connection=redis).meta.get("error") or ""), timeout=90)
    pre = s.post(f"{url}/prelabel?project=7", headers=GOOD_AUTH, timeout=5)
    assert pre.status_code == 202
    assert wait_for(lambda: _jobs_done(redis, [pre.json()["job_id"]]), timeout=60)

    # everything else, and oversized bodies
    for method, path in (("get", "/train/status?project=7"), ("get", "/models?project=7"), ("get", "/versions"),
                         ("get", "/metrics"), ("post", "/models/rollback?project=7&version=v0009")):
        assert s.request(method, f"{url}{path}", headers=GOOD_AUTH, timeout=10).status_code in (200, 404), path
    started = time.perf_counter()
    big = s.post(f"{url}/predict", data=b"{" + b" " * (50 * 1024 * 1024) + b"}", timeout=30,
                 headers={**GOOD_AUTH, "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["message"] and time.perf_counter() - started < 10
    chunks = (b" " * (1024 * 1024) for _ in range(50))
    chunked = s.post(f"{url}/predict", data=chunks, timeout=30, headers={**GOOD_AUTH, "Content-Type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"] == "request_entity_too_large"

    # the captured output of both processes: evidence it is the right output, and no secret in it
    time.sleep(1.0)  # access lines and the worker's last records are flushed
    texts = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert "POST /predict" in texts["gunicorn"] and "POST /webhook" in texts["gunicorn"]
    assert "gemini" in texts["gunicorn"].lower() and "client_error" in texts["gunicorn"]
    assert "prelabel" in texts["worker"] and "training" in texts["worker"]
    secrets = {**SECRETS, "LABEL_STUDIO_API_KEY": ls.pat, "basic-header": GOOD_AUTH["Authorization"].split()[1]}
    secrets.update({f"access-token-{i}": t for i, t in enumerate(sorted(ls._access_tokens))})
    leaks = [(name, process) for name, value in secrets.items() for process, text in texts.items() if value in text]
    assert leaks == [], f"secrets in the logs: {leaks}"
