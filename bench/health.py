"""5. /health latency while the backend is busy: idle, a long Gemini /predict, a long CPU-bound YOLO
/predict, and a training running beside the backend (as the RQ worker does on the same host).

Label Studio gives /health 1 s and asks it before every non-interactive predict; the goal is p99
≤ 50 ms in every state.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import requests

from bench.common import Context, project_id
from bench.fixtures import (
    fixed_answer,
    predict_body,
    register_version,
    synthetic,
    trained_checkpoint,
    upload_tasks,
    write_yolo_dataset,
)
from bench.results import Result, goal_row
from bench.servers import backend, finish_load, gemini_state_reset, start_load
from bench.stats import Stats, ratio

NAME = "health"
TITLE = "5. /health latency while busy"
STATUS_POLL_S = 0.3  # 10 status pages open, each polling every 3 s


def _probe(ctx: Context, url: str, seconds: float, label: str) -> list[float]:
    out = ctx.workdir / f"health-{label}-{time.time_ns()}.jsonl"
    proc = start_load(url, "/health", out, 20.0, seconds, threads=4, timeout=5.0)
    records = finish_load(proc, out, timeout=seconds + 30)
    bad = [r for r in records if r["status"] != 200]
    if bad:
        ctx.log(f"health: {len(bad)} failed probes during {label}: {bad[:2]}")
    return [r["lat"] if r["status"] == 200 else 5.0 for r in records]


def _busy(fn, until: threading.Event, counter: list[int]) -> threading.Thread:
    def loop():
        while not until.is_set():
            fn()
            counter[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def run(ctx: Context) -> Result:
    from tests import fake_gemini as fg
    from tests.fake_label_studio import FakeLabelStudio

    checkpoint = trained_checkpoint(ctx)
    seconds = ctx.pick(12.0, 3.0)
    train_budget_min = ctx.pick(0.5, 0.1)
    n_gemini, n_yolo = ctx.pick(64, 16), ctx.pick(128, 16)
    result = Result(NAME, TITLE, params={"probe_rate_hz": 20, "phase_s": seconds, "gemini_tasks": n_gemini,
                                         "gemini_latency_s": 1.0,
                                         "yolo_tasks": n_yolo, "training_budget_min": train_budget_min,
                                         "gunicorn": "2 workers x 8 threads"})
    slow = fixed_answer(1.0)
    mode = {"gemini": "slow"}

    def responder(req):
        if mode["gemini"] == "down":  # Gemini answers 400 at once: every task falls back to YOLO
            return fg.bad_request()
        return slow(req)

    gemini_state_reset(ctx)
    phases: dict[str, list[float]] = {}
    project = project_id()
    with FakeLabelStudio() as ls, fg.FakeGemini(responder=responder) as gemini:
        with backend(ctx, "health", workers=2, threads=8, ls=ls, gemini_api_key=fg.DEFAULT_KEY, gemini_base_url=gemini.base_url,
                     routing="gemini", gemini_breaker_failures=100000, gemini_cache_ttl=1,
                     # the long /predict calls are the load this bench puts on the serving process: answered
                     # inline, never sent to a background job by the latency planner (backend.serving.budget)
                     predict_timeout=600, predict_inline_share=1.0) as be:
            register_version(ctx, Path(be.env["MODEL_DIR"]), project, checkpoint)
            pid = int(project)
            gemini_tasks = upload_tasks(ls, pid, synthetic(n_gemini, seed=31))
            yolo_tasks = upload_tasks(ls, pid, synthetic(n_yolo, seed=32))
            mode["gemini"] = "down"
            for _ in range(2):  # every worker: model loaded, images cached
                requests.post(f"{be.url}/predict", json=predict_body(yolo_tasks, project), timeout=300).raise_for_status()
            phases["idle"] = _probe(ctx, be.url, seconds, "idle")

            # The status page: 10 browsers open on it, each polling status.json every 3 s (its own rate).
            label = "status page polled by 10 open browsers (status.json every 0.3 s)"
            stop, count = threading.Event(), [0]
            pages = _busy(lambda: (requests.get(f"{be.url}/status.json", timeout=30).raise_for_status(),
                                   time.sleep(STATUS_POLL_S)), stop, count)
            phases[label] = _probe(ctx, be.url, seconds, "status")
            stop.set()
            pages.join(60)
            ctx.log(f"health: {label}: {count[0]} status.json answers during the probe")

            counts: dict[str, list[int]] = {}
            for label, tasks, gemini_mode in (("long Gemini /predict (64 tasks, 1 s per call)", gemini_tasks, "slow"),
                                              (f"long YOLO /predict ({n_yolo} tasks, Gemini down)", yolo_tasks, "down")):
                mode["gemini"] = gemini_mode
                stop, count = threading.Event(), [0]
                body = predict_body(tasks, project)
                worker = _busy(lambda body=body: requests.post(f"{be.url}/predict", json=body, timeout=300), stop, count)
                time.sleep(0.5)
                phases[label] = _probe(ctx, be.url, seconds, "busy")
                stop.set()
                worker.join(300)
                counts[label] = count
                ctx.log(f"health: {label}: {count[0]} predicts completed during the probe")

            # A training beside the backend (the RQ worker's job), both cores busy: as deployed, then
            # with the settings proposed below (OpenMP threads that sleep when they wait, a lower priority).
            from bench.fixtures import train_in_subprocess

            items = synthetic(ctx.pick(96, 24), seed=33)
            for label, env, nice in (("training running beside the backend", None, 0),
                                     ("training beside it, OMP_WAIT_POLICY=PASSIVE and nice 10",
                                      {"OMP_WAIT_POLICY": "PASSIVE"}, 10)):
                work = ctx.tmp("health-train")
                data = write_yolo_dataset(work / "data", items[: len(items) * 3 // 4], items[len(items) * 3 // 4:])
                box: dict = {}
                trainer = threading.Thread(target=lambda box=box, data=data, work=work, env=env, nice=nice: box.update(
                    train_in_subprocess(data, work / "result.json", work / "train.log", time_min=train_budget_min,
                                        epochs=1000, data_dir=work, env=env, nice=nice)))
                trainer.start()
                time.sleep(ctx.pick(8.0, 5.0))  # imports and dataset checks done: the epochs are running
                phases[label] = _probe(ctx, be.url, seconds, "train")
                trainer.join(600)
    idle = Stats.of(phases["idle"])
    for label, samples in phases.items():
        s = Stats.of(samples)
        if label == "idle":
            result.add(goal_row("/health p99 idle (ms)",
                                f"{s.p99 * 1000:.1f} (p50 {s.p50 * 1000:.1f}, max {s.max * 1000:.1f}, n={s.n})",
                                s.p99, 0.05, False, "≤ 50 ms"))
            continue
        r = ratio(s.p99, idle.p99)
        during = "with" if "training" in label else "during"
        result.add(goal_row(f"/health p99 {during} a {label} (ms)",
                            f"{s.p99 * 1000:.1f} (p50 {s.p50 * 1000:.1f}, max {s.max * 1000:.1f}, n={s.n})",
                            s.p99, 0.05, False, "≤ 50 ms", baseline=f"idle p99 {idle.p99 * 1000:.1f}", ratio_text=f"{r:.1f}×"))
    result.raw = {k: v for k, v in phases.items()}
    missed = [r for r in result.rows if r.status == "MISSED"]
    if missed:
        result.notes.append(
            "p99 over 50 ms where marked: /health itself does nothing, so its latency is pure scheduling — the "
            "probe waits for a core, or for the GIL of a worker busy with YOLO pre/post-processing, while YOLO "
            "inference (torch: 2 OpenMP threads that spin while they wait) or the training process hold both "
            "cores. Label Studio's limit is 1 s, far above these figures. The last row measures the proposed "
            "deployment of the RQ worker: OMP_WAIT_POLICY=PASSIVE and `nice -n 10` (scripts/run.sh, Dockerfile, "
            "docker-compose.yml); serving YOLO from the OpenVINO export also shortens the CPU bursts inside the "
            "web worker ~3× (section 3).")
    result.method = ("gunicorn as deployed (2 workers × 8 gthreads, ROUTING=gemini with a YOLO version promoted). "
                     "`bench.loadgen` in its own process probes GET /health 20 times a second, new connection each "
                     "(like Label Studio), for each phase: idle; while /predict calls of 64 tasks run back to back "
                     "against a fake Gemini answering after 1 s (I/O-bound); while status.json is read every 0.3 s "
                     "(10 status pages open, each polling every 3 s); while /predict calls run back to back "
                     "with Gemini answering 400 at once so every task falls back to YOLO in one batch (CPU-bound, "
                     "inside the serving process); while `worker.training.trainer.train` runs in another process at default "
                     "settings with a time budget (what the RQ worker does on the same host), as deployed and then "
                     "with OMP_WAIT_POLICY=PASSIVE under `nice 10`.")
    return result
