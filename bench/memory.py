"""8. Memory: RSS of the serving process after 100 and after 10,000 YOLO predictions.

Every task has its own image (10,000 distinct URLs and images), so per-URL or per-image state
(the image cache's bookkeeping, metric labels, caches without bounds) would show up as growth.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.common import Context, project_id
from bench.fixtures import predict_body, register_version, synthetic, trained_checkpoint, upload_tasks
from bench.results import Result, Row, goal_row
from bench.servers import backend

NAME = "memory"
TITLE = "8. Memory: backend RSS after 100 and 10,000 predictions"
TASKS_PER_REQUEST = 4


def run(ctx: Context) -> Result:
    import psutil

    checkpoint = trained_checkpoint(ctx)
    total = ctx.pick(10_000, 600)
    checkpoints = sorted({100, 1000, 2500, 5000, total} if not ctx.quick else {100, 300, total})
    result = Result(NAME, TITLE, params={"predictions": total, "tasks_per_request": TASKS_PER_REQUEST,
                                         "image": "96x72 PNG, all distinct",
                                         "YOLO_IMGSZ": 160, "gunicorn": "1 worker x 8 threads", "client_threads": 2})
    project = project_id()
    items = synthetic(total, seed=808, size=(96, 72), max_objects=2)
    with backend(ctx, "memory", workers=1, threads=8, routing="yolo", yolo_imgsz=160) as be:
        register_version(ctx, Path(be.env["MODEL_DIR"]), project, checkpoint)
        tasks = upload_tasks(be.ls, int(project), items)
        del items
        pids = be.worker_pids()
        assert len(pids) == 1, pids
        proc = psutil.Process(pids[0])
        rss_start = proc.memory_info().rss
        bodies = [predict_body(tasks[i:i + TASKS_PER_REQUEST], project) for i in range(0, total, TASKS_PER_REQUEST)]
        done = [0]
        lock = threading.Lock()
        samples: dict[int, float] = {}
        failures = [0]
        session = requests.Session()

        def send(body):
            try:
                response = session.post(f"{be.url}/predict", json=body, timeout=120)
                ok = response.status_code == 200 and len(response.json()["results"]) == len(body["tasks"])
            except Exception:
                ok = False
            with lock:
                if not ok:
                    failures[0] += 1
                done[0] += len(body["tasks"])

        started = time.monotonic()
        sent = 0
        with ThreadPoolExecutor(max_workers=2) as pool:
            for mark in checkpoints:
                batch = []
                while sent < mark:
                    batch.append(bodies[sent // TASKS_PER_REQUEST])
                    sent += TASKS_PER_REQUEST
                list(pool.map(send, batch))
                time.sleep(0.5)
                samples[done[0]] = proc.memory_info().rss / 2**20
                ctx.log(f"memory: {done[0]} predictions, worker RSS {samples[done[0]]:.0f} MiB "
                        f"({time.monotonic() - started:.0f} s)")
        elapsed = time.monotonic() - started
    first = samples[min(samples)]
    last = samples[max(samples)]
    growth = (last - first) / first
    result.add(goal_row(f"worker RSS after {max(samples):,} predictions (MiB)", f"{last:.0f}", growth, 0.10, False,
                        "growth ≤ 10%",
                        baseline=f"after {min(samples):,}: {first:.0f}", ratio_text=f"{100 * growth:+.1f}%"))
    result.add(Row("RSS along the way (MiB)", ", ".join(f"{k:,}: {v:.0f}" for k, v in sorted(samples.items())),
                   note=f"at start (model not loaded yet) {rss_start / 2**20:.0f}"))
    result.add(goal_row("failed /predict requests", str(failures[0]), failures[0], 0, False, "0",
                        note=f"{total / elapsed:.0f} predictions/s"))
    result.raw = {"rss_mib": samples, "seconds": elapsed}
    if growth > 0.10:
        result.notes.append(f"RSS grew {100 * growth:.1f}% between {min(samples):,} and {max(samples):,} predictions.")
    result.method = (f"gunicorn (1 worker × 8 gthreads, ROUTING=yolo, YOLO_IMGSZ=160 to keep the run short — the code "
                     f"path is the same) serving a registry version (.pt). {total:,} tasks, each with its own 96×72 PNG "
                     f"served by the fake Label Studio, sent {TASKS_PER_REQUEST} per /predict from 2 client threads; "
                     f"the worker's RSS (psutil) is read after each mark, 0.5 s after the last answer.")
    return result
