"""1. Bulk pre-annotation: one /predict with 64 tasks against a Gemini that answers after L seconds.

Label Studio's "Retrieve Predictions" sends every selected task in ONE /predict. The backend fans
the tasks out over GEMINI_CONCURRENCY threads; the baseline is the same GeminiDetector called once
per task, one after another, in one process (no cache, images already decoded: the baseline does
strictly less work than the pipeline, which also downloads and decodes every image).
"""

from __future__ import annotations

import hashlib

import requests

from bench.common import Context, project_id
from bench.fixtures import fixed_answer, predict_body, synthetic, upload_tasks
from bench.results import Result, Row, goal_row
from bench.servers import backend, gemini_state_reset
from bench.stats import Stats, ratio, timed

NAME = "bulk"
TITLE = "1. Bulk pre-annotation: 64 tasks in one /predict (Gemini)"


def run(ctx: Context) -> Result:
    from backend.core.label_config import ProjectConfig
    from backend.core.settings import Settings
    from backend.detectors.gemini.client import GeminiDetector
    from bench.fixtures import label_config
    from tests import fake_gemini as fg
    from tests.fake_label_studio import FakeLabelStudio

    n_tasks = ctx.pick(64, 16)
    latencies = ctx.pick([1.0, 0.2], [0.2])
    pipeline_repeats = ctx.pick(3, 1)
    concurrency = Settings().gemini_concurrency
    result = Result(NAME, TITLE, params={"tasks": n_tasks, "gemini_latency_s": latencies, "GEMINI_CONCURRENCY": concurrency,
                                         "gunicorn": "1 worker x 8 threads", "pipeline_repeats": pipeline_repeats})
    state = {"latency": latencies[0]}
    config = ProjectConfig.parse(label_config())
    gemini_state_reset(ctx)
    seed = 1000
    with FakeLabelStudio() as ls, fg.FakeGemini(responder=lambda req: fixed_answer(state["latency"])(req)) as gemini:
        project = project_id()
        pid = int(project)
        with backend(ctx, "bulk", workers=1, threads=8, ls=ls, gemini_api_key=fg.DEFAULT_KEY,
                     gemini_base_url=gemini.base_url, routing="gemini", gemini_timeout=30, gemini_task_deadline=60) as be:
            # Warm-up: Gemini client, Label Studio token exchange, first request of the worker. One task: a
            # single task is always answered inline, and it replaces the pessimistic latency prior
            # (GEMINI_TASK_DEADLINE) with a measurement, so the 64-task batches are planned inline, as after any
            # first request of a live worker.
            state["latency"] = 0.0
            warm = upload_tasks(ls, pid, synthetic(1, seed=1))
            requests.post(f"{be.url}/predict", json=predict_body(warm, project), timeout=60).raise_for_status()
            for latency in latencies:
                state["latency"] = latency
                times, served = [], []
                for _ in range(pipeline_repeats):
                    seed += 1  # new images every time: no cache hit anywhere
                    tasks = upload_tasks(ls, pid, synthetic(n_tasks, seed=seed))
                    calls_before = len(gemini.calls)
                    body = predict_body(tasks, project)
                    elapsed, response = timed(lambda body=body: requests.post(f"{be.url}/predict", json=body, timeout=600))
                    response.raise_for_status()
                    results = response.json()["results"]
                    assert len(results) == n_tasks, f"{len(results)} results for {n_tasks} tasks"
                    served.append(sum(1 for r in results
                                      if len(r["result"]) == 3 and r["result"][0].get("meta", {}).get("source") == "gemini"))
                    times.append(elapsed)
                    ctx.log(f"bulk: latency {latency}s: {n_tasks} tasks in {elapsed:.2f}s, "
                            f"{len(gemini.calls) - calls_before} Gemini calls, {served[-1]} tasks drafted by Gemini")
                # The baseline: the same detector, one task after another, no cache.
                settings = Settings(gemini_api_key=fg.DEFAULT_KEY, gemini_base_url=gemini.base_url, redis_url=ctx.redis_url,
                                    gemini_timeout=30, gemini_task_deadline=60)
                detector = GeminiDetector(settings, None)
                seq_n = n_tasks if latency <= 0.25 or not ctx.quick else 8
                seq_repeats = 1 if latency >= 0.5 else ctx.pick(2, 1)
                seq_times = []
                for _ in range(seq_repeats):
                    seed += 1
                    images = synthetic(seq_n, seed=seed)
                    decoded = [(im.image, hashlib.sha256(im.encode()).hexdigest()) for im in images]

                    def sequential(decoded=decoded, detector=detector):
                        for image, sha in decoded:
                            detector.detect(image, sha, config)

                    seq_times.append(timed(sequential)[0] * n_tasks / seq_n)
                detector.close()
                pipe, seq = Stats.of(times), Stats.of(seq_times)
                speedup = ratio(seq.median, pipe.median)
                ideal_rate = concurrency / latency
                rate = n_tasks / pipe.median
                result.add(goal_row(
                    f"{n_tasks} tasks, Gemini answering after {latency:g} s: one /predict (s)",
                    pipe.spread(unit=" s"), speedup, 8.0, True, "≥ 8×",
                    baseline=f"sequential detect loop {seq.spread(unit=' s')}", ratio_text=f"{speedup:.2f}× faster"))
                rounds = -(-n_tasks // concurrency)
                ceiling = n_tasks / concurrency / rounds  # the last round is not full
                result.add(goal_row(
                    f"… throughput vs ideal concurrency/latency = {ideal_rate:g} tasks/s",
                    f"{rate:.2f} tasks/s", rate / ideal_rate, 0.9, True, "≥ 90% of ideal",
                    baseline=f"{ideal_rate:g} tasks/s ideal", ratio_text=f"{100 * rate / ideal_rate:.1f}%",
                    note=(f"{n_tasks} tasks in {rounds} rounds of {concurrency}: at most {100 * ceiling:.1f}% of this ideal; "
                          f"{100 * (rounds * latency) / pipe.median:.1f}% of the {rounds} × {latency:g} s = "
                          f"{rounds * latency:g} s "
                          f"a perfect pipeline takes") if ceiling < 1 else ""))
                result.add(Row(f"… tasks drafted by Gemini (latency {latency:g} s)", f"{min(served)}/{n_tasks} (worst repeat)"))
                result.raw[f"latency_{latency}"] = {"pipeline_s": times, "sequential_s": seq_times, "served": served}
                per_call = seq.median / n_tasks - latency
                if rate / ideal_rate < 0.9:
                    per_task = (pipe.median - rounds * latency) / n_tasks
                    result.notes.append(
                        f"Latency {latency:g} s: {100 * rate / ideal_rate:.0f}% of ideal (goal 90%). The request takes "
                        f"{1000 * (pipe.median - rounds * latency):.0f} ms more than its {rounds} rounds of {latency:g} s: "
                        f"{1000 * per_task:.1f} ms per task, the CPU each task needs in the backend process, serialised on "
                        f"the GIL (py-spy: the google-genai SDK building and parsing the request ~2.5 ms, image download "
                        f"and PNG decode, JPEG encode, Redis look-ups of cache, budget and breaker, logging; "
                        f"{1000 * per_call:.1f} ms per call in the sequential loop). Calls finishing together queue for it, "
                        f"so every task adds its share whatever the concurrency: n × {1000 * per_task:.1f} ms on top of "
                        f"n / {concurrency} × {latency:g} s, about {100 * per_task * concurrency / latency:.0f}% here, "
                        f"{100 * per_task * concurrency:.0f}% at 1 s. 90% at {latency:g} s with {concurrency} in flight needs ≤ "
                        f"{1000 * 0.1 * latency / concurrency / 0.9:.1f} ms per task; fewer in flight would meet the "
                        f"ratio but not the 8× (at 8, the ideal itself is 8×). Real Gemini calls take 1–5 s, where the "
                        f"same overhead is ≤ 5%.")
                if speedup < 8.0:
                    ceiling = ratio(seq.median, n_tasks / concurrency * latency)
                    result.notes.append(
                        f"Latency {latency:g} s: {speedup:.2f}× misses 8× by {100 * (1 - speedup / 8):.1f}%. 8× is the ceiling "
                        f"itself: with {concurrency} calls in flight the best possible time is {n_tasks}/{concurrency} rounds × "
                        f"{latency:g} s = {n_tasks / concurrency * latency:.1f} s, and the sequential loop pays the same "
                        f"per-call overhead as the pipeline (a pipeline at exactly the ideal time would score {ceiling:.2f}× "
                        f"against this loop). The 90%-of-ideal goal is the "
                        f"meaningful one; GEMINI_CONCURRENCY above 8 is what buys more than 8×.")
    result.method = (f"gunicorn (1 worker × 8 gthreads, default settings, ROUTING=gemini, GEMINI_CONCURRENCY={concurrency}: "
                     f"images load on their own threads, each Gemini call starts when its image is in) "
                     f"against tests/fake_gemini.py answering every call the given latency after the request arrived, "
                     f"with a fixed 3-box answer (its own CPU cost, ~2 ms per call on the same 2 cores, falls inside that "
                     f"latency as Google's work would), images served by tests/fake_label_studio.py (PNG, 320×240, "
                     f"downloaded and decoded "
                     f"by the backend). Fresh images for every repeat, so neither the image cache nor the Gemini answer "
                     f"cache ever hits. Baseline: the same GeminiDetector (no cache) called once per task in a loop "
                     f"in one process on already-decoded images.")
    return result
