"""The backend under gunicorn: /health and /setup stay fast while a slow /predict runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from backend.core.registry import ModelRegistry
from tests import fake_gemini as fg
from tests.backend.web.test_app import FIXTURES, UPLOAD, red_car_image
from tests.fake_label_studio import FakeLabelStudio
from tests.live import base_env, gunicorn, wait_for
from tests.models import make_checkpoint

SLOW_GEMINI_SECONDS = 4.0


secrets: dict[str, str] = {}


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, redis_url):
    tmp = tmp_path_factory.mktemp("server")
    slow = fg.Oracle(colors={"Car": (220, 30, 30)})
    with FakeLabelStudio() as ls, fg.FakeGemini(responder=lambda req: fg.delayed(slow(req), SLOW_GEMINI_SECONDS)) as gemini:
        secrets["ls"] = ls.pat
        ls.files[UPLOAD] = red_car_image()
        env = base_env(
            REDIS_URL=redis_url, MODEL_DIR=tmp / "models", DATA_DIR=tmp / "data",
            LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat,
            GEMINI_API_KEY=fg.DEFAULT_KEY, GEMINI_BASE_URL=gemini.base_url,
            GEMINI_TIMEOUT=10, GEMINI_TASK_DEADLINE=20, GEMINI_CACHE_TTL=1,
        )
        with gunicorn(env, tmp / "gunicorn.log", workers=1, threads=4) as url:
            yield url, gemini, tmp / "gunicorn.log"


def test_health_and_setup_answer_while_a_slow_predict_runs(slow_server):
    url, gemini, _ = slow_server
    body = json.loads(json.dumps(FIXTURES[6]["body"]))
    body["tasks"][0]["data"]["image"] = UPLOAD
    done = threading.Event()
    outcome: dict = {}

    def slow_predict():
        outcome["response"] = requests.post(f"{url}/predict", json=body, timeout=60)
        done.set()

    thread = threading.Thread(target=slow_predict)
    thread.start()
    # Wait until the fake Gemini has the call in hand, so /predict is really in flight.
    deadline = time.monotonic() + 10
    while not gemini.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gemini.requests, "the predict never reached Gemini"

    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        health = requests.get(f"{url}/health", timeout=1)
        setup = requests.post(f"{url}/setup", json={"project": "2.1", "schema": body["label_config"]}, timeout=1)
        latencies.append(time.perf_counter() - started)
        assert health.status_code == 200 and health.json()["status"] == "UP"
        assert setup.status_code == 200 and setup.json()["model_version"]
    # Every health/setup pair was answered while the predict was still waiting on Gemini ...
    assert not done.is_set()
    thread.join(60)
    # ... and the predict itself then succeeded with Gemini's box.
    response = outcome["response"]
    assert response.status_code == 200
    assert response.json()["results"][0]["result"][0]["meta"]["source"] == "gemini"
    # Label Studio gives /health and /setup 1 s and 3 s: each pair above fit inside the 1 s timeout.
    assert max(latencies) < 1.0


def test_logs_carry_no_secret(slow_server):
    _, _, log_path = slow_server
    # The access line is written just after the response went out.
    assert wait_for(lambda: "POST /predict" in Path(log_path).read_text(), timeout=10), "no access log line for /predict"
    text = Path(log_path).read_text()
    assert fg.DEFAULT_KEY not in text
    assert secrets["ls"] not in text


@pytest.mark.slow  # a gunicorn start and a model load: about 30 s on a busy 2-core machine
def test_the_worker_warms_up_before_the_first_setup(tmp_path, redis_url):
    """post_worker_init builds the services and loads the current model: the first /setup builds nothing."""
    project = str(500000 + int(time.time() * 1000) % 99999)
    registry = ModelRegistry(tmp_path / "models", redis.Redis.from_url(redis_url))
    checkpoint = make_checkpoint(tmp_path / "m.pt", ["Car"])
    registry.promote(project, registry.add_version(project, checkpoint, {"classes": ["Car"]}).version)
    log_path = tmp_path / "gunicorn.log"
    env = base_env(REDIS_URL=redis_url, MODEL_DIR=tmp_path / "models", DATA_DIR=tmp_path / "data")
    schema = FIXTURES[1]["body"]["schema"]
    with gunicorn(env, log_path, workers=1, threads=4) as url:
        health = wait_for(lambda: (h := requests.get(f"{url}/health", timeout=1).json())["status"] == "UP" and h,
                          timeout=60, message="the warm-up to finish", on_timeout=lambda: log_path.read_text()[-3000:])
        assert health["warm_up"] == "done"
        before = log_path.read_text()
        assert "services built in" in before and "by thread lsb-warm-up" in before
        assert f"project {project} now serves YOLO v0001" in before and "warm-up done" in before
        setup = requests.post(f"{url}/setup", json={"project": project, "schema": schema}, timeout=3)
        assert setup.status_code == 200 and setup.json()["model_version"].endswith("yolo:v0001")
        wait_for(lambda: "POST /setup" in log_path.read_text(), timeout=10, message="the /setup access line")
    text = log_path.read_text()
    # Built once, by the warm-up thread; the model was loaded once, before the request.
    assert text.count("services built in") == 1 and text.count(f"project {project} now serves YOLO") == 1
