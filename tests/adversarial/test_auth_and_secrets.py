"""Who may call what, what a caller can spend, and no secret in any log.

- With any credential configured (Basic auth: BASIC_AUTH_USER / BASIC_AUTH_PASS, or the shared secret
  WEBHOOK_SECRET: header X-Webhook-Secret or ?token=), every route of the OpenAPI description except the
  open ones (/health, /openapi.json) needs one of them; the shipped configuration (only the secret) closes
  /predict, /setup, /models, /versions, /metrics and /train/status too. The .env.example placeholder is
  refused at start. Malformed credentials are a 401, never a 500.
- Spend is bounded by default: a daily Gemini budget (GEMINI_DAILY_BUDGET_USD, 5 USD) and prompt text from
  label hints and the interactive query cut at PROMPT_MAX_CHARS.
- Comparisons are constant-time: every check goes through ``hmac.compare_digest``, and the user and
  the password are both compared even when the user is already wrong (no early exit to time).
- The real deployment (gunicorn + an ``rq worker``) with every secret set, driven through all routes,
  including failing ones (a Gemini key the API refuses, Label Studio going down mid-way, jobs failing
  in the worker), and secrets sent where they do not belong (a /webhook/<secret> path segment, percent-
  encoded, the user agent, a malformed request line): the captured output of both processes, gunicorn's
  access log included, contains none of the secrets.
(Unit cases of backend.web.auth and backend.core.logs are in tests/backend/web/test_auth.py and tests/backend/core/test_logs.py.)
"""

from __future__ import annotations

import base64
import hmac
import http.client
import os
import signal
import socket
import subprocess
import time
from urllib.parse import quote, urlsplit

import pytest
import requests
from rq.job import Job

from backend.core.settings import Settings
from backend.web import auth
from backend.web.openapi import build_spec
from tests import fake_gemini as fg
from tests.adversarial import CONFIG, PROJECT, car_picture, encode, predict_body, task
from tests.fake_label_studio import FakeLabelStudio
from tests.live import BIN, ROOT, base_env, free_port, gunicorn, rq_worker, wait_for

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
            # the secret first (missing: compared as ""), then Basic auth, on every protected route
            assert calls[0] == (b"", HOOK.encode()) and calls[1:] == expected, (path, calls)


# --- the shipped configuration: only WEBHOOK_SECRET ----------------------------------------------------

@pytest.fixture
def secret_only(app_factory, private_redis):
    """What .env.example gives once its placeholder is replaced: a secret, no Basic auth."""
    private_redis.client().flushall()
    handle = app_factory(private_redis.url, basic_auth_user="", basic_auth_pass="", webhook_secret=HOOK)
    yield handle
    private_redis.client().flushall()


def test_with_only_the_secret_every_route_but_the_open_ones_needs_it(secret_only):
    """Before: /predict, /setup, /models, /versions, /metrics and /train/status answered anyone."""
    client = secret_only.client
    closed = []
    for path, method, is_open in operations(secret_only.settings):
        for name, headers in BAD_CREDENTIALS.items():
            response = client.open(path, method=method.upper(), headers=headers, json={}, query_string={"project": "7"})
            if is_open:
                assert response.status_code == 200, (path, name)
                continue
            assert response.status_code == 401, (path, method, name, response.status_code)
            closed.append(path)
        if not is_open:
            for kwargs in ({"headers": {"X-Webhook-Secret": HOOK}}, {"query_string": {"token": HOOK, "project": "7"}}):
                kwargs.setdefault("query_string", {"project": "7"})
                response = client.open(path, method=method.upper(), json={"project": 7}, **kwargs)
                assert response.status_code not in (401, 403) and response.status_code < 500, (path, kwargs)
    assert {"/predict", "/setup", "/models", "/versions", "/metrics", "/train/status"} <= set(closed)


def test_the_env_example_placeholder_is_refused_at_start(tmp_path, private_redis):
    """gunicorn as deployed, with .env.example's WEBHOOK_SECRET: it exits naming the placeholder."""
    port = free_port()
    env = base_env(REDIS_URL=private_redis.url, MODEL_DIR=tmp_path / "models", DATA_DIR=tmp_path / "data",
                   WEBHOOK_SECRET="replace-with-a-long-random-string", PORT=port, WORKERS=1, THREADS=2,
                   BIND=f"127.0.0.1:{port}")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "backend.web.wsgi:app"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode != 0, output[-3000:]
    assert "WEBHOOK_SECRET is still the placeholder from .env.example" in output, output[-3000:]


# --- spend with the shipped defaults -------------------------------------------------------------------

HINTED = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="Car" hint="' + "h" * 5000 + '"/><Label value="Person"/></RectangleLabels></View>')


@pytest.fixture
def spender(app_factory, private_redis):
    """The app with Basic auth, a fake Gemini and Label Studio serving three different pictures; no budget override."""
    private_redis.client().flushall()
    ls, gemini = FakeLabelStudio().start(), fg.FakeGemini().start()
    for i in range(3):
        ls.files[f"/data/upload/7/car{i}.png"] = encode(car_picture(size=(64 + i, 48)))
    handle = app_factory(private_redis.url, gemini=gemini, ls=ls, basic_auth_user=USER, basic_auth_pass=PASSWORD)
    try:
        yield handle, gemini
    finally:
        ls.stop()
        gemini.stop()
        private_redis.client().flushall()


def _generate_calls(gemini) -> list:
    return [call for call in gemini.calls if call.is_generate]


def test_a_daily_gemini_budget_is_on_by_default(spender):
    """Before: GEMINI_DAILY_BUDGET_USD defaulted to 0 (no budget), so Gemini was called whatever the day's spend."""
    handle, gemini = spender
    assert handle.settings.gemini_daily_budget_usd == 5.0
    gemini.script(fg.boxes([], output_tokens=3_000_000))  # 7.50 USD at the default output price
    for i in range(3):
        response = handle.client.post("/predict", json=predict_body([task(i, f"/data/upload/7/car{i}.png")]),
                                      headers=GOOD_AUTH)
        assert response.status_code == 200 and len(response.json["results"]) == 1
    assert len(_generate_calls(gemini)) == 1, "the budget is spent after the first call: Gemini is skipped"


def test_prompt_text_from_hints_and_the_interactive_query_is_capped(spender):
    """Before: a 5000-character hint and query went to Gemini whole, and every variant made a new cache key."""
    handle, gemini = spender
    limit = handle.settings.prompt_max_chars
    assert limit == 500
    for tail in ("x" * 5000, "x" * 5000 + "y" * 100):  # the two queries differ only after the cap
        body = predict_body([task(1, "/data/upload/7/car0.png")], config=HINTED)
        body["params"] = {"context": {"result": [{"type": "textarea", "value": {"text": ["find the red car " + tail]}}]}}
        response = handle.client.post("/predict", json=body, headers=GOOD_AUTH)
        assert response.status_code == 200 and len(response.json["results"]) == 1
    calls = _generate_calls(gemini)
    assert len(calls) == 1, "the second query is the first cut at PROMPT_MAX_CHARS: an answer-cache hit"
    prompt = calls[0].prompt
    assert "h" * limit in prompt and "h" * (limit + 1) not in prompt
    assert ("find the red car " + "x" * (limit - 17)) in prompt and "x" * (limit - 16) not in prompt


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

    # secrets where they do not belong (before: gunicorn's access line printed /webhook/<secret>): as a path
    # segment, percent-encoded, in the user agent, and in a request line gunicorn rejects (its error log)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    hook_escaped = "".join(f"%{byte:02X}" for byte in HOOK.encode())
    for method, path, headers in (("POST", f"/webhook/{HOOK}", {}), ("GET", f"/webhook/{hook_escaped}", hook),
                                  ("POST", f"/predict/{quote(PASSWORD, safe='')}", GOOD_AUTH),
                                  ("GET", "/health", {"User-Agent": f"probe {SECRETS['GEMINI_API_KEY']}"})):
        connection = http.client.HTTPConnection(host, port, timeout=5)  # sends the path byte for byte
        connection.request(method, path, headers=headers)
        assert connection.getresponse().status in (200, 401, 404, 405), path
        connection.close()
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(f"GET /webhook/{HOOK}?token={HOOK} HTTP/1.1 junk\r\nHost: x\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 400")

    # the captured output of both processes: evidence it is the right output, and no secret in it
    time.sleep(1.0)  # access lines and the worker's last records are flushed
    texts = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert "POST /predict" in texts["gunicorn"] and "POST /webhook" in texts["gunicorn"]
    assert '"POST /webhook/*** HTTP/1.1" 401' in texts["gunicorn"] and '"GET /webhook/*** HTTP/1.1" 404' in texts["gunicorn"]
    assert '"POST /predict/*** HTTP/1.1" 404' in texts["gunicorn"] and '"probe ***"' in texts["gunicorn"]
    assert "gemini" in texts["gunicorn"].lower() and "client_error" in texts["gunicorn"]
    assert "prelabel" in texts["worker"] and "training" in texts["worker"]
    secrets = {**SECRETS, "LABEL_STUDIO_API_KEY": ls.pat, "basic-header": GOOD_AUTH["Authorization"].split()[1]}
    secrets.update({f"access-token-{i}": t for i, t in enumerate(sorted(ls._access_tokens))})
    leaks = [(name, process) for name, value in secrets.items() for process, text in texts.items() if value in text]
    assert leaks == [], f"secrets in the logs: {leaks}"
