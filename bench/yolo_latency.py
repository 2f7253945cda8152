"""2. YOLO fallback latency: /predict with 1 and 16 tasks (ROUTING=yolo) vs Ultralytics called directly.

The overhead ratio is what HTTP, JSON, image fetch (from the backend's image cache after the first
time) and decode, routing and region building add to the model call itself. The batching gain is
one 16-task request against 16 one-task requests sent one after another.
"""

from __future__ import annotations

import requests

from bench.common import Context, project_id
from bench.fixtures import predict_body, register_version, synthetic, trained_checkpoint, upload_tasks
from bench.results import Result, Row, goal_row
from bench.servers import backend
from bench.stats import Stats, ratio, timed

NAME = "yolo_latency"
TITLE = "2. YOLO fallback latency: /predict vs Ultralytics directly"


def _direct_model(checkpoint, images):
    """Ultralytics in this process: same checkpoint, images, conf and torch threads as the backend.

    The one place YOLO is called directly on purpose: it is the baseline the serving path is measured against.
    """
    from ultralytics import YOLO

    from backend.core import ultralytics_env

    model = YOLO(str(checkpoint))
    model.predict(images[:1], imgsz=320, conf=0.25, device="cpu", verbose=False)  # sets the predictor up
    ultralytics_env.restore_torch_threads()  # the backend uses every core (YOLO_THREADS=0)
    for image in images:  # warm every shape
        model.predict([image], imgsz=320, conf=0.25, device="cpu", verbose=False)
    model.predict(images, imgsz=320, conf=0.25, device="cpu", verbose=False)
    return lambda batch: model.predict(batch, imgsz=320, conf=0.25, device="cpu", verbose=False)


def run(ctx: Context) -> Result:
    checkpoint = trained_checkpoint(ctx)
    n1, n16, rounds = ctx.pick(60, 10), ctx.pick(20, 3), ctx.pick(8, 2)
    items = synthetic(16, seed=77)
    images = [item.image for item in items]
    result = Result(NAME, TITLE, params={"one_task_requests": n1, "sixteen_task_requests": n16, "rounds_of_16_single": rounds,
                                         "imgsz": 320, "image": "320x240 PNG", "gunicorn": "1 worker x 8 threads"})
    project = project_id()
    with backend(ctx, "yolo", workers=1, threads=8, routing="yolo") as be:
        from pathlib import Path

        register_version(ctx, Path(be.env["MODEL_DIR"]), project, checkpoint)
        tasks = upload_tasks(be.ls, int(project), items)

        def predict(batch):
            response = requests.post(f"{be.url}/predict", json=predict_body(batch, project), timeout=120)
            response.raise_for_status()
            results = response.json()["results"]
            assert len(results) == len(batch) and results[0]["model_version"].startswith("yolo:v"), results[0]
            return results

        for _ in range(2):  # model load, image downloads into the backend's cache, every shape warm
            predict(tasks)
            for task in tasks:
                predict([task])
        direct = _direct_model(checkpoint, images)
        # Served and direct calls alternate, so a change in the machine's load hits both alike; the
        # backend is idle while the direct call runs and the other way round.
        one, direct_one, many, direct_many, singles = [], [], [], [], []
        for i in range(n1):
            one.append(timed(lambda i=i: predict([tasks[i % len(tasks)]]))[0])
            direct_one.append(timed(lambda i=i: direct([images[i % len(images)]]))[0])
        for i in range(n16):
            many.append(timed(lambda: predict(tasks))[0])
            direct_many.append(timed(lambda: direct(images))[0])
            if i < rounds:
                singles.append(timed(lambda: [predict([t]) for t in tasks])[0])
        boxes = sum(len(r["result"]) for r in predict(tasks))
    s1, s16, d1, d16, sing = Stats.of(one), Stats.of(many), Stats.of(direct_one), Stats.of(direct_many), Stats.of(singles)
    for label, served, direct in (("1 task", s1, d1), ("16 tasks", s16, d16)):
        r50 = ratio(served.p50, direct.p50)
        result.add(goal_row(f"/predict {label}: p50 / p95 (ms)", f"{served.p50 * 1000:.1f} / {served.p95 * 1000:.1f}",
                            r50, 1.2, False, "p50 ≤ 1.2× direct",
                            baseline=f"Ultralytics direct {direct.p50 * 1000:.1f} / {direct.p95 * 1000:.1f}",
                            ratio_text=f"p50 {r50:.2f}×, p95 {ratio(served.p95, direct.p95):.2f}×"))
    gain = ratio(sing.median, s16.median)
    result.add(goal_row("16 tasks in one request vs 16 one-task requests (ms)", s16.spread(1000, " ms", 0), gain, 1.5, True,
                        "≥ 1.5×",
                        baseline=f"16 requests {sing.spread(1000, ' ms', 0)}", ratio_text=f"{gain:.2f}× faster"))
    per_task_overhead = (s1.p50 - d1.p50) * 1000
    result.add(Row("fixed cost per /predict beyond the model call (p50)", f"{per_task_overhead:.1f} ms",
                   note=f"{boxes} boxes drawn on the 16 images"))
    result.raw = {"predict_1": one, "predict_16": many, "singles_16": singles, "direct_1": direct_one, "direct_16": direct_many}
    if ratio(s1.p50, d1.p50) > 1.2:
        result.notes.append(
            f"1 task: the backend adds {per_task_overhead:.1f} ms to a {d1.p50 * 1000:.1f} ms model call "
            f"({ratio(s1.p50, d1.p50):.2f}×, goal 1.2×): HTTP with a new connection, JSON, reading the cached image "
            f"and PNG decode, Redis look-ups of the served version, region building and logging. With the "
            f"OpenVINO export (section 3) the model call itself gets ~3× shorter, so this fixed cost weighs even more; "
            f"it matters little in absolute terms (Label Studio waits up to 100 s).")
    result.method = ("gunicorn (1 worker × 8 gthreads, ROUTING=yolo) serving a registry version (.pt, no export) of a "
                     "small YOLO11n trained on the synthetic shapes (imgsz 320); the 16 task images (320×240 PNG) are "
                     "served by the fake Label Studio and cached by the backend after the warm-up. Requests are sent "
                     "one at a time from the benchmark process. Baseline: `YOLO(checkpoint).predict(images, imgsz=320, "
                     "conf=0.25)` in the benchmark process on the same decoded images with the same torch thread count "
                     "(all cores), alternating call by call with the served requests (each runs while the other is idle).")
    return result
