"""Two minutes at the highest rate the machine holds, on the YOLO path, through the real gunicorn.

ROUTING=yolo, the model promoted in the registry, images from a fake Label Studio over HTTP (fetched
once, then from the image cache), requests on loopback from a thread pool in this process. The load is
closed-loop: each client sends its next request when the previous one is answered, so the server runs
at its saturation rate. The first 30 s step the concurrency up (2, 4, 8 clients) and keep the level
with the best throughput for the remaining 90 s; worker memory is measured after those 30 s (warm) and
at the end. Bounded: 120 s (``LSB_LOAD_SECONDS``) and at most 200,000 requests.

Asserted: 0 errors (every answer 200 with one prediction of the served version), gunicorn workers' RSS
(from /proc) grows by at most 10 %, and no worker died or was replaced.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from backend.core.registry import ModelRegistry
from tests.adversarial import car_picture, encode, predict_body, rss_kb, task
from tests.fake_label_studio import FakeLabelStudio
from tests.live import base_env, gunicorn
from tests.models import make_checkpoint

pytestmark = pytest.mark.slow

LOAD_SECONDS = float(os.environ.get("LSB_LOAD_SECONDS", "120"))
STEPS = (2, 4, 8)  # client threads tried during calibration
STEP_SECONDS = LOAD_SECONDS / 4 / len(STEPS)  # 10 s per level for 120 s: a quarter of the time calibrates
MAX_REQUESTS = 200_000
MAX_RSS_GROWTH = 0.10
IMAGES = [f"/data/upload/7/load-{i}.png" for i in range(4)]


class Load:
    """Closed-loop clients; counts answers, errors and latencies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.ok = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.sent = 0

    def run(self, clients: int, seconds: float) -> float:
        """Run ``clients`` loops for ``seconds``; return the rate (answers per second) of this phase."""
        stop_at = time.monotonic() + seconds
        before = self.ok

        def loop(worker: int) -> None:
            session = requests.Session()
            i = worker
            while time.monotonic() < stop_at:
                with self.lock:
                    if self.sent >= MAX_REQUESTS:
                        return
                    self.sent += 1
                i += 1
                body = predict_body([task(i, IMAGES[i % len(IMAGES)])])
                started = time.perf_counter()
                try:
                    response = session.post(f"{self.url}/predict", json=body, timeout=30)
                    elapsed = time.perf_counter() - started
                    problem = None
                    if response.status_code != 200:
                        problem = f"HTTP {response.status_code}: {response.text[:200]}"
                    else:
                        results = response.json()["results"]
                        if len(results) != 1 or results[0]["model_version"] != "yolo:v0001":
                            problem = f"bad answer: {str(results)[:200]}"
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    elapsed, problem = time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
                with self.lock:
                    if problem:
                        self.errors.append(problem)
                    else:
                        self.ok += 1
                        self.latencies.append(elapsed)
            session.close()

        started = time.monotonic()
        with ThreadPoolExecutor(clients, thread_name_prefix="load") as pool:
            list(pool.map(loop, range(clients)))
        return (self.ok - before) / max(time.monotonic() - started, 1e-6)


def _worker_pids(log_text: str) -> list[int]:
    return sorted({int(p) for p in re.findall(r"Booting worker with pid: (\d+)", log_text)})


def test_two_minutes_at_full_rate_on_the_yolo_path(tmp_path, private_redis):
    checkpoint = make_checkpoint(tmp_path / "load.pt", ["Car", "Person"])
    registry = ModelRegistry(tmp_path / "models", private_redis.client())
    registry.promote("7", registry.add_version("7", checkpoint, {"classes": ["Car", "Person"]}).version)
    log_path = tmp_path / "gunicorn.log"
    with FakeLabelStudio() as ls:
        for i, path in enumerate(IMAGES):
            ls.files[path] = encode(car_picture((320 + 32 * i, 240), (40, 30, 200, 150)))
        env = base_env(REDIS_URL=private_redis.url, MODEL_DIR=tmp_path / "models", DATA_DIR=tmp_path / "data",
                       LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat, ROUTING="yolo", YOLO_SCORE_THRESHOLD="0.004",
                       LOG_LEVEL="INFO")
        with gunicorn(env, log_path, workers=2, threads=4) as url:
            # every worker loads the model and the images before the clock starts
            warm = requests.Session()
            for i in range(8):
                assert warm.post(f"{url}/predict", json=predict_body([task(i, IMAGES[i % 4])]), timeout=60).status_code == 200
            pids = _worker_pids(log_path.read_text())
            assert len(pids) == 2, log_path.read_text()[-2000:]

            load = Load(url)
            started = time.monotonic()
            rates = {clients: load.run(clients, STEP_SECONDS) for clients in STEPS}
            best = max(rates, key=rates.get)
            rss_warm = {pid: rss_kb(pid) for pid in pids}
            rate = load.run(best, LOAD_SECONDS - (time.monotonic() - started))
            total_seconds = time.monotonic() - started
            rss_end = {pid: rss_kb(pid) for pid in pids}
            pids_after = _worker_pids(log_path.read_text())

    latencies = sorted(load.latencies)
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    summary = (f"{load.ok} answers in {total_seconds:.0f} s; "
               f"calibration {', '.join(f'{c} clients {r:.1f}/s' for c, r in rates.items())}; "
               f"then {best} clients at {rate:.1f}/s; p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
               f"RSS warm {rss_warm} kB, end {rss_end} kB")
    print(summary)
    assert load.errors == [], f"{len(load.errors)} errors, first: {load.errors[:3]}; {summary}"
    assert abs(total_seconds - LOAD_SECONDS) < 10, summary
    assert load.ok >= 3 * LOAD_SECONDS, f"too few answers to call this load: {summary}"
    assert pids_after == pids, f"a worker died or was replaced: {pids} -> {pids_after}"
    for pid in pids:
        assert rss_end[pid] <= rss_warm[pid] * (1 + MAX_RSS_GROWTH), f"worker {pid} grew: {summary}"
    assert sum(rss_end.values()) <= sum(rss_warm.values()) * (1 + MAX_RSS_GROWTH), summary
