"""7. Training cost and quality: one retrain at the project's default settings, and what it reaches.

Each training runs ``worker.training.trainer.train`` (what the RQ job calls) in its own process at the default
settings of backend/settings.py (TRAIN_EPOCHS, raised by TRAIN_MIN_STEPS for small datasets, TRAIN_IMGSZ,
TRAIN_BATCH, nbs = batch, no time limit), from yolo11n.yaml (random init, passed explicitly by bench.train_child: the
default YOLO_BASE_MODEL is pretrained weights, which a host without network cannot have), on synthetic shapes split
80/20 like the job's held-out split. Peak memory is the child's ru_maxrss. Quality: held-out mAP50 (the serving
detector scored by pycocotools, as the promotion gate scores it) of our defaults vs the reference recipe of
docs/ultralytics.md#measured-cost (nbs = batch plus a 5-minute time budget, i.e. TRAIN_TIME_LIMIT_MIN=5) on 128 train /
48 held-out images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.common import ROOT, TRAIN_ENV, Context
from bench.fixtures import synthetic, train_in_subprocess, write_yolo_dataset
from bench.results import Result, Row, goal_row
from bench.stats import Stats, ratio

NAME = "training"
TITLE = "7. Training cost (time, peak RSS) and quality in a fixed CPU budget"


def _dataset(ctx: Context, n_train: int, n_val: int, seed: int):
    work = ctx.tmp(f"train-{n_train}")
    items = synthetic(n_train + n_val, seed=seed)
    return work, write_yolo_dataset(work / "data", items[:n_train], items[n_train:])


def _steps(threads: int, steps: int, passive: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-m", "bench.step_child", str(threads), str(steps), "20"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return Stats.of(json.loads(out.strip().splitlines()[-1])["steps_s"]).median


def _contention(ctx: Context, result: Result) -> None:
    """Training steps with 2 torch threads, 2 threads + OMP_WAIT_POLICY=PASSIVE, 1 thread; idle and contended."""
    steps = ctx.pick(4, 1)
    variants = (("2 threads", 2, False), ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, True), ("1 thread", 1, False))
    figures: dict[str, dict[str, float]] = {"idle": {}, "contended": {}}
    for name, threads, passive in variants:
        figures["idle"][name] = _steps(threads, steps, passive)
    burners = [subprocess.Popen([sys.executable, "-m", "bench.step_child", "burn", "600"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(2)]
    try:
        time.sleep(0.5)
        for name, threads, passive in variants:
            figures["contended"][name] = _steps(threads, steps, passive)
    finally:
        for proc in burners:
            proc.kill()
            proc.wait(10)
    for state, label in (("idle", "idle machine"), ("contended", "2 CPU-bound processes beside it")):
        f = figures[state]
        base = f["2 threads"]
        result.add(Row(f"one training step (YOLO11n, batch 16, imgsz 320), {label} (s)",
                       " / ".join(f"{name} {v:.2f}" for name, v in f.items()),
                       baseline=f"2 threads {base:.2f}",
                       ratio=" / ".join(f"{ratio(base, v):.2f}×" for v in f.values())))
    result.raw["contention"] = figures
    slow = ratio(figures["contended"]["2 threads"], figures["contended"]["2 threads, OMP_WAIT_POLICY=PASSIVE"])
    if slow > 1.2:
        result.notes.append(
            f"Under CPU contention torch's OpenMP threads spin-wait for each other: 2 threads are {slow:.1f}× slower than "
            f"2 threads with OMP_WAIT_POLICY=PASSIVE (idle cost of PASSIVE: "
            f"{ratio(figures['idle']['2 threads, OMP_WAIT_POLICY=PASSIVE'], figures['idle']['2 threads']):.2f}×). The RQ "
            f"worker trains beside gunicorn on the same 2 cores, so set OMP_WAIT_POLICY=PASSIVE for the worker (and the "
            f"web processes) in scripts/run.sh, the Dockerfile and docker-compose.yml.")


def run(ctx: Context) -> Result:
    from backend.core.settings import Settings

    defaults = Settings()
    sizes = ctx.pick([50, 100, 200], [16, 32])
    quick_epochs = 2
    budget_min = ctx.pick(5.0, 0.25)
    n_train, n_val = ctx.pick((128, 48), (24, 12))
    result = Result(NAME, TITLE, params={
        "TRAIN_EPOCHS": defaults.train_epochs if not ctx.quick else f"{quick_epochs} (quick)",
        "TRAIN_IMGSZ": defaults.train_imgsz, "TRAIN_BATCH": defaults.train_batch, "nbs": "= batch",
        "TRAIN_MIN_STEPS": defaults.train_min_steps if not ctx.quick else "0 (quick)",
        "TRAIN_TIME_LIMIT_MIN": defaults.train_time_limit_min, "YOLO_BASE_MODEL": "yolo11n.yaml (random init)",
        "reference_budget_min": budget_min, "images": "synthetic shapes 320x240, 1-3 objects, 3 classes",
        "OMP_WAIT_POLICY": "PASSIVE"})
    epochs = None if not ctx.quick else quick_epochs
    ctx.log("training: step time with 1/2 threads, idle and under contention")
    _contention(ctx, result)
    ctx.partial(result)
    # Quality in a fixed budget: our defaults vs the reference recipe, same data.
    work, data = _dataset(ctx, n_train, n_val, seed=4)
    ctx.log(f"training: defaults on {n_train}/{n_val}")
    ours = train_in_subprocess(data, work / "ours.json", work / "ours.log", epochs=epochs, data_dir=work, env=TRAIN_ENV)
    ctx.log(f"training: defaults: {ours['wall_s']:.0f} s, mAP50 {ours['map50']}; reference ({budget_min} min budget) next")
    ref = train_in_subprocess(data, work / "ref.json", work / "ref.log", time_min=budget_min, epochs=1000, data_dir=work,
                              env=TRAIN_ENV)
    ctx.log(f"training: reference: {ref['wall_s']:.0f} s, {ref['epochs_run']} epochs, mAP50 {ref['map50']}")
    share = ratio(ours["map50"] or 0.0, ref["map50"] or 0.0)
    result.add(goal_row(f"held-out mAP50, our defaults, {n_train} train / {n_val} held out",
                        f"{ours['map50'] or 0:.3f} in {ours['wall_s'] / 60:.1f} min ({ours['epochs_run']} epochs, "
                        f"peak {ours['peak_rss_mb']:.0f} MB)",
                        share, 0.9, True, "≥ 90% of the reference",
                        baseline=f"reference (nbs=batch, {budget_min:g} min budget): {ref['map50'] or 0:.3f} in "
                                 f"{ref['wall_s'] / 60:.1f} min, "
                                 f"{ref['epochs_run']} epochs", ratio_text=f"{100 * share:.0f}%"))
    result.add(Row("Reference figures (docs/ultralytics.md) for the same recipes",
                   "reference 0.96; nbs=64 defaults 30 epochs 0.28; nbs=16 25 epochs 0.55",
                   note="measured on another machine of this kind, for comparison only"))
    if share < 0.9:
        result.notes.append(
            f"Our defaults reach {100 * share:.0f}% of the reference mAP50 (goal 90%): TRAIN_EPOCHS=30 with no time limit "
            f"stops after {ours['epochs_run']} epochs / {ours['wall_s'] / 60:.1f} min, while the learning-rate schedule of "
            f"the reference is fitted to the whole {budget_min:g}-minute budget. Proposed defaults: TRAIN_TIME_LIMIT_MIN=5 "
            f"(Ultralytics' `time=` then sets the epoch count to fill the budget and the schedule follows it; TRAIN_EPOCHS "
            f"only matters when the limit is 0) — that *is* the reference recipe, so it reaches its figure by "
            f"construction; keep nbs = batch. For fine-tuning rounds a shorter budget (1–2 min) suffices (docs/ultralytics.md: "
            f"10 epochs on 64 new images kept mAP).")
    result.raw = {"ours": ours, "reference": ref}
    ctx.partial(result)
    runs = {}
    for n in sizes:
        n_val_s = max(2, round(n * defaults.train_val_fraction))
        work, data = _dataset(ctx, n - n_val_s, n_val_s, seed=500 + n)
        ctx.log(f"training: {n} images ({n - n_val_s} train / {n_val_s} held out) at defaults")
        runs[n] = train_in_subprocess(data, work / "result.json", work / "train.log", epochs=epochs, data_dir=work,
                                      env=TRAIN_ENV)
        r = runs[n]
        ctx.log(f"training: {n} images: {r['wall_s']:.0f} s, {r['epochs_run']} epochs, peak RSS {r['peak_rss_mb']:.0f} MB, "
                f"mAP50 {r['map50']}")
        result.add(Row(f"retrain at defaults, {n} images ({n - n_val_s} train / {n_val_s} held out)",
                       f"{r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                       note=f"{r['epochs_run']} epochs, held-out mAP50 {r['map50']:.3f}" if r["map50"] is not None else ""))
        ctx.partial(result)
    weak = [n for n in sizes if (runs[n]["map50"] or 0) < 0.5]
    if weak and not ctx.quick:
        maps = ", ".join(f"{runs[n]['map50'] or 0:.3f}" for n in weak)
        result.notes.append(
            f"At defaults the {', '.join(map(str, weak))}-image run(s) reached held-out mAP50 {maps} "
            f"({', '.join(str(runs[n]['epochs_run']) for n in weak)} epochs): too few optimizer steps from random init "
            f"even at TRAIN_MIN_STEPS={defaults.train_min_steps}, and with no current model the gate promotes whatever "
            f"comes out. A minimum mAP for a first promotion would keep a useless model from serving.")
    if not ctx.quick and ours["wall_s"] > budget_min * 60 * 1.05:
        result.notes.append(
            f"Our defaults have no time limit: here they needed {ours['wall_s'] / 60:.1f} min for the reference's "
            f"{budget_min:g}-minute budget (same mAP50); on a slower or busier host they overshoot it further.")
    small, large = sizes[0], sizes[-1]
    scale = ratio(runs[large]["wall_s"], runs[small]["wall_s"])
    result.add(Row(f"time scaling {small} → {large} images ({large / small:g}× the data)", f"{scale:.2f}× the time",
                   baseline=f"{runs[small]['wall_s']:.0f} s", ratio=f"{scale:.2f}×",
                   note=f"memory {ratio(runs[large]['peak_rss_mb'], runs[small]['peak_rss_mb']):.2f}×"))
    per = {n: runs[n].get("epoch_s") or runs[n]["wall_s"] / max(1, runs[n]["epochs_run"]) for n in sizes}
    fixed = {n: runs[n]["wall_s"] - per[n] * runs[n]["epochs_run"] for n in sizes}
    result.add(Row("seconds per epoch (train + val), by dataset size", ", ".join(f"{n}: {per[n]:.1f}" for n in sizes),
                   note="fixed cost per run (process start, imports, dataset scan, final validation): "
                        + ", ".join(f"{n}: {fixed[n]:.0f} s" for n in sizes)))

    result.raw["scaling"] = runs
    result.method = ("`bench.train_child` runs `worker.training.trainer.train(data.yaml, Settings(...))` in a child process "
                     "(wall time from spawn to exit, imports and Ultralytics' final validation included; peak RSS = "
                     "the child's ru_maxrss from wait4). Datasets are written directly in YOLO format (JPEG q95) from "
                     "tests/synthetic.py images; the held-out images are Ultralytics' val split. Every run starts from "
                     "yolo11n.yaml (random init), seed 0, 2 torch threads, OMP_WAIT_POLICY=PASSIVE (see the "
                     "step-time rows: the default spin-wait is what a busy shared host punishes; on an idle one "
                     "the two policies are compared in the same rows).")
    return result
