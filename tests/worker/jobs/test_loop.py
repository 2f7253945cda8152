"""The whole loop with real processes: webhook → RQ training job → promotion → hot-swap in a
running gunicorn (two workers), which then answers /setup and /predict from the new model."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests

from tests.live import base_env, gunicorn, rq_worker, wait_for
from tests.worker_fixtures import cleanup_queues, make_settings, populate, settings_env

pytestmark = pytest.mark.slow
SECRET = "loop-secret-1234"
# With WEBHOOK_SECRET set every route but /health needs a credential (backend.web.auth).
HOOK = {"X-Webhook-Secret": SECRET}


def gunicorn_workers(url: str) -> set[int]:
    """PIDs of the gunicorn workers serving ``url`` (children of the master listening on its port)."""
    port = url.rsplit(":", 1)[1]
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"gunicorn" in part for part in cmd) and f"PORT={port}".encode() in env:
                pids.add(int(entry.name))
    return pids


def versions_seen(url: str, config: str, n: int = 12) -> set[str]:
    """The model versions /setup reports over several requests (spread over both workers)."""
    seen = set()
    for _ in range(n):
        seen.add(requests.post(f"{url}/setup", json={"project": f"{PROJECT}.1", "schema": config},
                               headers=HOOK, timeout=3).json()["model_version"])
    return seen


PROJECT = 0


def test_webhook_trains_promotes_and_every_worker_swaps_without_restart(tmp_path, redis15, project_id, fake_ls):
    global PROJECT
    pid, images, ids = populate(fake_ls, n=24, project=project_id)
    PROJECT = pid
    config = fake_ls.projects[pid]["label_config"]
    prefix = f"loop{uuid.uuid4().hex[:6]}:"
    settings = make_settings(tmp_path, fake_ls, train_epochs=2, promote_min_gain=-1.0)
    env = base_env(**settings_env(settings), LSB_QUEUE_PREFIX=prefix, WEBHOOK_SECRET=SECRET, ROUTING="yolo",
                   YOLO_SCORE_THRESHOLD="0.001", HOTSWAP_POLL_SECONDS="0.5")
    task = {"id": ids[0], "data": fake_ls.tasks[ids[0]]["data"]}
    try:
        with gunicorn(env, tmp_path / "web.log", workers=2, threads=4) as url, \
                rq_worker(env, [prefix + "training", prefix + "prelabel"], tmp_path / "worker.log"):
            workers_before = gunicorn_workers(url)
            assert len(workers_before) >= 2
            assert versions_seen(url, config) == {"no-model"}
            empty = requests.post(f"{url}/predict", json={"tasks": [task], "label_config": config, "project": f"{pid}.1"},
                                  headers=HOOK, timeout=30).json()
            assert empty["results"] == [{"result": [], "score": 0.0, "model_version": "no-model"}]

            # Label Studio's "Start Training" arrives as a webhook.
            response = requests.post(f"{url}/webhook?token={SECRET}", json={"action": "START_TRAINING", "project": {"id": pid}},
                                     timeout=2)
            assert response.status_code == 201, response.text
            assert wait_for(lambda: versions_seen(url, config) == {"yolo:v0001"}, timeout=400, interval=1.0), (
                (tmp_path / "worker.log").read_text()[-3000:])
            status = requests.get(f"{url}/train/status", params={"project": pid}, headers=HOOK, timeout=2).json()
            assert status["current_version"] == "v0001"

            prediction = requests.post(f"{url}/predict", json={"tasks": [task], "label_config": config, "project": f"{pid}.1"},
                                       headers=HOOK, timeout=30).json()["results"][0]
            assert prediction["model_version"] == "yolo:v0001"
            assert prediction["result"], "the trained model proposes boxes at threshold 0.001"
            assert {r["meta"]["source"] for r in prediction["result"]} == {"yolo"}

            # A second round (forced promotion: PROMOTE_MIN_GAIN=-1) swaps again, in both workers.
            assert requests.post(f"{url}/train", params={"project": pid, "token": SECRET}, timeout=2).status_code == 202
            assert wait_for(lambda: versions_seen(url, config) == {"yolo:v0002"}, timeout=400, interval=1.0), (
                (tmp_path / "worker.log").read_text()[-3000:])
            assert gunicorn_workers(url) == workers_before, "the serving processes were never restarted"
            metrics = requests.get(f"{url}/metrics", headers=HOOK, timeout=5).text
            swaps = [line for line in metrics.splitlines() if line.startswith("lsb_model_swaps_total{")]
            # v0002 was loaded by every worker before its promotion, so its swap loaded nothing
            assert any(line.startswith('lsb_model_swaps_total{outcome="preloaded"}') for line in swaps), swaps
    finally:
        cleanup_queues(redis15, prefix)
