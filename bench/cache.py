"""6. Cache: the same tasks predicted again cost no Gemini call (Redis answer cache + image cache)."""

from __future__ import annotations

import requests

from bench.common import Context, project_id
from bench.fixtures import fixed_answer, predict_body, synthetic, upload_tasks
from bench.results import Result, Row, goal_row
from bench.servers import backend, gemini_state_reset
from bench.stats import Stats, ratio, timed

NAME = "cache"
TITLE = "6. Cache: the same 64 tasks predicted again"


def run(ctx: Context) -> Result:
    from tests import fake_gemini as fg
    from tests.fake_label_studio import FakeLabelStudio

    n_tasks = ctx.pick(64, 8)
    latency = ctx.pick(0.2, 0.05)
    repeats = ctx.pick(3, 1)
    result = Result(NAME, TITLE, params={"tasks": n_tasks, "gemini_latency_s": latency, "repeats": repeats,
                                         "gunicorn": "1 worker x 8 threads"})
    gemini_state_reset(ctx)
    firsts, seconds, calls_first, calls_second, same = [], [], [], [], []
    with FakeLabelStudio() as ls, fg.FakeGemini(responder=fixed_answer(latency)) as gemini:
        project = project_id()
        pid = int(project)
        with backend(ctx, "cache", workers=1, threads=8, ls=ls, gemini_api_key=fg.DEFAULT_KEY,
                     gemini_base_url=gemini.base_url, routing="gemini") as be:
            warm = upload_tasks(ls, pid, synthetic(1, seed=2))
            requests.post(f"{be.url}/predict", json=predict_body(warm, project), timeout=60).raise_for_status()
            for r in range(repeats):
                tasks = upload_tasks(ls, pid, synthetic(n_tasks, seed=6000 + r))
                body = predict_body(tasks, project)
                answers = []
                for bucket, calls in ((firsts, calls_first), (seconds, calls_second)):
                    before = len(gemini.calls)
                    elapsed, response = timed(lambda body=body: requests.post(f"{be.url}/predict", json=body, timeout=300))
                    response.raise_for_status()
                    bucket.append(elapsed)
                    calls.append(len(gemini.calls) - before)
                    answers.append([[(x["value"], x["value"].get("rectanglelabels")) for x in t["result"]]
                                    for t in response.json()["results"]])
                same.append(answers[0] == answers[1])
                ctx.log(f"cache: first {firsts[-1]:.2f}s ({calls_first[-1]} calls), "
                        f"again {seconds[-1]:.3f}s ({calls_second[-1]} calls)")
    first, second = Stats.of(firsts), Stats.of(seconds)
    result.add(goal_row(f"Gemini calls when the same {n_tasks} tasks are predicted again", f"{max(calls_second)} (worst repeat)",
                        max(calls_second), 0, False, "0", baseline=f"{min(calls_first)} calls the first time"))
    speed = ratio(first.median, second.median)
    result.add(Row(f"time of the repeat /predict ({n_tasks} tasks)", second.spread(1000, " ms", 0),
                   baseline=f"first /predict {first.spread(unit=' s')}", ratio=f"{speed:.1f}× faster"))
    result.add(goal_row("repeat answers identical to the first ones", f"{sum(same)}/{len(same)} repeats", sum(same), len(same),
                        True, "all"))
    result.raw = {"first_s": firsts, "second_s": seconds, "calls_first": calls_first, "calls_second": calls_second}
    result.method = (f"gunicorn (1 worker × 8 gthreads, ROUTING=gemini) with the fake Gemini answering after {latency:g} s; "
                     f"{n_tasks} new tasks are predicted, then the identical request is sent again. Gemini calls are counted "
                     f"at the fake server. The repeat is served from the Redis answer cache (key: image hash, prompt, model, "
                     f"answer-shaping settings) and the on-disk image cache.")
    return result
