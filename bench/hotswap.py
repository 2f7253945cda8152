"""4. Hot-swap under load: promote new versions while another process sends 15 /predict per second.

Each new version is preloaded first, as a training does (``ModelRegistry.preload``: every gunicorn
worker loads and warms it beside the serving model and acknowledges it), then promoted: the swap
itself is a pointer assignment. Latency is watched both in the 2 s after each promotion (the swap)
and while the candidate loads (announce to promotion).

Swap delay = time from ``registry.promote`` until the LAST gunicorn worker logged that it serves the
new version ("project P now serves YOLO vN", with its pid) — from then on every worker answers with
it. Checked from the client side too: the last answer carrying an older version, among requests
sent after the promotion.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

import requests

from bench.common import Context, project_id
from bench.fixtures import predict_body, register_version, synthetic, trained_checkpoint, upload_tasks, verified_exports
from bench.formats import int8_export
from bench.results import Result, Row, goal_row
from bench.servers import backend, finish_load, start_load
from bench.stats import Stats, percentile, ratio

NAME = "hotswap"
TITLE = "4. Hot-swap under steady load"
_SWAP = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (?P<pid>\d+) \S+: "
                   r"project (?P<project>\d+) now serves YOLO (?P<version>v\d+)")


def _swap_times(log_path: Path, project: str) -> dict[str, dict[int, float]]:
    """version -> {pid: epoch seconds of its swap} from the backend log."""
    out: dict[str, dict[int, float]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = _SWAP.match(line)
        if m and m.group("project") == project:
            ts = dt.datetime.strptime(m.group("ts"), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.setdefault(m.group("version"), {})[int(m.group("pid"))] = ts
    return out


def _variant(ctx: Context, label: str, checkpoint: Path, exports: dict | None, rate: float, swaps: int, interval: float,
             before: float, preload: bool = True) -> dict:
    project = project_id()
    items = synthetic(16, seed=55)
    with backend(ctx, f"hotswap-{label}", workers=2, threads=8, routing="yolo") as be:
        model_dir = Path(be.env["MODEL_DIR"])
        registry, _ = register_version(ctx, model_dir, project, checkpoint, exports=exports)
        tasks = upload_tasks(be.ls, int(project), items)
        bodies = [predict_body([t], project) for t in tasks]
        # Warm every worker (a first request for a project loads its model) on fresh connections.
        for i in range(40):
            requests.post(f"{be.url}/predict", json=bodies[i % len(bodies)], timeout=60,
                          headers={"Connection": "close"}).raise_for_status()
        workers = be.worker_pids()
        warm = _swap_times(be.log_path, project).get("v0001", {})
        duration = before + swaps * interval + 1.0
        out = ctx.workdir / f"load-{label}-{project}.jsonl"
        started = time.time() + 0.5
        proc = start_load(be.url, "/predict", out, rate, duration, bodies, threads=16, start_at=started)
        promotions: list[tuple[str, float]] = []
        preloads: list[tuple[float, float, dict]] = []  # (announced at, promoted at, ModelRegistry.preload's answer)
        time.sleep(max(0.0, started + before - time.time()))
        for _ in range(swaps):
            info = registry.add_version(project, checkpoint, {"classes": ["Car", "Person", "Sign"], "imgsz": 320},
                                        extra_files=exports)
            announced = time.time()
            answer = registry.preload(project, info.version, timeout=30.0) if preload else {}
            t = time.time()
            registry.promote(project, info.version)
            promotions.append((info.version, t))
            preloads.append((announced, t, answer))
            time.sleep(max(0.0, announced + interval - time.time()))
        records = finish_load(proc, out, timeout=duration + 60)
        time.sleep(0.5)
        swaps_seen = _swap_times(be.log_path, project)
        text = be.log_path.read_text(errors="replace")
        served_format = ("OpenVINO INT8 export" if "serves from its openvino_int8 export" in text
                         else "OpenVINO f32 export" if "serves from its openvino export" in text
                         else "ONNX export" if "serves from its onnx export" in text else ".pt")
        # swaps after the warm-up that did not find their model preloaded
        preloaded_swaps = text.count(f"project {project} now serves YOLO") - text.count("(preloaded, was") - len(warm)
    return {"project": project, "workers": workers, "warm": warm, "promotions": promotions, "records": records,
            "swaps": swaps_seen, "started": started, "before": before, "format": served_format, "preloads": preloads,
            "loaded_on_promotion": preloaded_swaps}


def release_ms(path: Path, repeats: int = 3) -> float:
    """Median ms that dropping a loaded, warmed model takes in this process (``del``, no gc): the swap's one
    cost left on a worker after preloading, paid while holding the GIL, so every request of the worker waits."""
    from backend.detectors.yolo import YoloDetector

    times = []
    for _ in range(repeats):
        model = YoloDetector(path, "release-probe", imgsz=320)
        model.warm_up()
        started = time.perf_counter()
        del model
        times.append((time.perf_counter() - started) * 1000)
    return Stats.of(times).median


def _analyse(result: Result, label: str, data: dict, n_workers: int) -> None:
    records = data["records"]
    promotions = data["promotions"]
    first_promotion = promotions[0][1] if promotions else float("inf")
    delays, stale_delays, missing = [], [], 0
    for k, (version, t) in enumerate(promotions):
        per_worker = data["swaps"].get(version, {})
        if len(per_worker) < n_workers:
            missing += 1
            continue
        delays.append(max(per_worker.values()) - t)
        older = [r for r in records if r["t"] >= t and r["mv"] and r["mv"] != f"yolo:{version}"
                 and (k + 1 >= len(promotions) or r["t"] < promotions[k + 1][1])]
        stale_delays.append(max((r["t"] - t for r in older), default=0.0))
    failed = [r for r in records if r["status"] != 200]
    # The steady period ends when the first candidate is announced, not promoted: the requests served while it
    # loads belong to the "while the candidate loads" row, not to the baseline both rows are compared with.
    first_change = min([first_promotion, *(announced for announced, _, _ in data["preloads"])])
    before = [r["lat"] for r in records if data["started"] + 1.0 <= r["t"] < first_change]
    during = [r["lat"] for r in records
              if any(t <= r["t"] < t + 2.0 for _, t in promotions)]
    sent = len(records)
    span = (max(r["t"] for r in records) - min(r["t"] for r in records)) if records else 0
    d = Stats.of(delays)
    p95 = percentile(delays, 95) if delays else float("inf")
    result.add(goal_row(f"[{label}] time until every worker serves the new version, p95 (s)",
                        f"{p95:.2f} (median {d.median:.2f}, max {d.max:.2f}, {len(delays)} promotions × {n_workers} workers)",
                        p95, 2.0, False, "≤ 2 s",
                        note=(f"{missing} promotion(s) not picked up by every worker" if missing else "")))
    result.add(Row(f"[{label}] … last answer with an older version, after the promotion (s)",
                   f"p95 {percentile(stale_delays, 95):.2f}, max {max(stale_delays, default=0):.2f}",
                   note="client side: send time of the last stale answer"))
    result.add(goal_row(f"[{label}] failed requests during the run", f"{len(failed)} of {sent}", len(failed), 0, False, "0",
                        note=f"{sent / span:.1f} req/s sent" if span else ""))
    b99, w99 = percentile(before, 99), percentile(during, 99)
    r = ratio(w99, b99)
    result.add(goal_row(f"[{label}] p99 latency in the 2 s after each promotion (ms)", f"{w99 * 1000:.0f} (n={len(during)})",
                        r, 2.0, False, "≤ 2× before", baseline=f"steady, before any candidate {b99 * 1000:.0f} (n={len(before)})",
                        ratio_text=f"{r:.2f}×"))
    answers = [a for _, _, a in data["preloads"] if a]
    if answers:
        first_load = [r["lat"] for r in records if data["preloads"][0][0] <= r["t"] < data["preloads"][0][1]]
        later_load = [r["lat"] for r in records if any(a <= r["t"] < p for a, p, _ in data["preloads"][1:])]
        loading = first_load + later_load  # the candidates load one after another: their windows never overlap
        l99 = percentile(loading, 99) if loading else float("nan")
        waits = [a["waited_s"] for a in answers]
        result.add(Row(f"[{label}] preloading: workers that loaded each candidate before its promotion",
                       f"{min(a['loaded'] for a in answers)}–{max(a['loaded'] for a in answers)} of "
                       f"{max(a['listeners'] for a in answers)} listeners, wait median {Stats.of(waits).median:.2f} s "
                       f"(max {max(waits):.2f})",
                       note=f"{sum(a['timed_out'] for a in answers)} timed out; "
                            f"{data['loaded_on_promotion']} swap(s) had to load at promotion"))
        result.add(Row(f"[{label}] … p99 latency while the candidate loads (announce → promotion) (ms)",
                       f"{l99 * 1000:.0f} (n={len(loading)})", baseline=f"steady, before any candidate {b99 * 1000:.0f}",
                       ratio=f"{ratio(l99, b99):.2f}×",
                       note=(f"first candidate: max {max(first_load, default=0) * 1000:.0f} ms (n={len(first_load)}); "
                             f"later ones: max {max(later_load, default=0) * 1000:.0f} ms (n={len(later_load)})")))
    if data.get("release_ms") is not None:
        result.add(Row(f"[{label}] … dropping the old model after the swap (ms, GIL held)", f"{data['release_ms']:.1f}",
                       note="in-process `del` of a loaded, warmed model, median of 3 (bench.hotswap.release_ms)"))
        if r > 2.0:
            result.notes.append(
                f"[{label}] the swap is a pointer assignment, but the old model is then dropped: "
                f"{data['release_ms']:.0f} ms of C++ teardown holding the GIL (row above), which every request of "
                f"that worker waits for, on top of a steady p99 of {b99 * 1000:.0f} ms. Deferring the release only "
                "moves the stall; what would remove it is a runtime that releases the GIL in its destructor.")
    result.raw[label] = {"delays": delays, "stale": stale_delays, "failed": failed[:20], "p99_before": b99, "p99_during": w99,
                         "served_format": data["format"], "preloads": data["preloads"]}
    if (p95 > 2.0 or r > 2.0 or failed) and not answers:
        why = ("each worker builds the new model (YOLO(path) unpickles the checkpoint, ~30-130 ms of CPU holding the "
               "GIL, so it stays at normal priority: at nice 19 a starved thread holding the GIL stalled every request, "
               "p99 5.6 s) and warms it up (first predict; "
               + ("an OpenVINO compile, ~250 ms; " if data["format"] == "OpenVINO export" else "")
               + "on a short-lived thread at nice 19) inside the process that serves, both workers at the same moment "
               "on 2 cores beside the load generator, while a request takes ~5-25 ms. The p99 of the ~180 requests in "
               "the window rests on its 2 slowest: across runs of this code it ranged 1.5-5× for the .pt and 1.5-2.0× "
               "for OpenVINO. Next step: workers load a version when its export check passes, before it is promoted, "
               "so the promotion itself is a pointer swap")
        result.notes.append(f"[{label}] goal missed (p95 swap {p95:.2f} s, p99 ratio {r:.2f}×, {len(failed)} failures): {why}.")


def run(ctx: Context) -> Result:
    checkpoint = trained_checkpoint(ctx)
    rate, swaps, interval, before = 15.0, ctx.pick(6, 2), ctx.pick(4.0, 3.0), ctx.pick(8.0, 3.0)
    variants = [(".pt", None)]
    exports, _ = verified_exports(ctx, checkpoint)
    if "openvino" in exports or "onnx" in exports:
        variants.insert(0, ("export", exports))
    int8_path, _ = int8_export(ctx, checkpoint)
    if int8_path is not None:
        variants.insert(0, ("export", {**exports, "openvino_int8": int8_path}))
    result = Result(NAME, TITLE, params={"rate_req_s": rate, "promotions": swaps, "interval_s": interval,
                                         "gunicorn": "2 workers x 8 threads", "HOTSWAP_POLL_SECONDS": 1.0,
                                         "preload": "ModelRegistry.preload, timeout 30 s",
                                         "request": "/predict, 1 task 320x240"})
    served = {"OpenVINO INT8 export": int8_path, "OpenVINO f32 export": exports.get("openvino"), ".pt": checkpoint}
    for label, ex in variants:
        data = _variant(ctx, label, checkpoint, ex, rate, swaps, interval, before)
        name = f"{data['format']}" if label == "export" else ".pt"
        if served.get(name) is not None:
            data["release_ms"] = release_ms(Path(served[name]))
        _analyse(result, name, data, len(data["workers"]) or 2)
        ctx.log(f"hotswap [{name}]: workers {data['workers']}, {len(data['records'])} requests")
    result.method = ("gunicorn as deployed (2 workers × 8 gthreads, ROUTING=yolo, HOTSWAP_POLL_SECONDS=1) serving a "
                     "registry version; `bench.loadgen` in its own process sends 15 one-task /predict per second, "
                     "open loop, a new connection each (as Label Studio does). After a steady period, new versions "
                     f"(same weights, new version names) are promoted every {interval:g} s through ModelRegistry "
                     "(Redis key + pub/sub). Swap time per worker comes from its log line; latency windows: the "
                     "steady period before the first candidate is announced vs the 2 s after each promotion, and the time each "
                     "candidate was loading (ModelRegistry.preload: announce, every worker loads it beside the served "
                     "model and acknowledges, then the promotion). Variants: versions with a verified INT8 OpenVINO "
                     "export, with f32 exports (the worker serves OpenVINO f32) and .pt-only versions. A new model warms up on a "
                     "short-lived thread at nice 19 (except the first OpenVINO model of a process, whose warm-up gives birth to "
                     "the OpenVINO worker threads that run every later inference), then once on the inference thread.")
    return result
