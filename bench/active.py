"""11. Active learning: does annotating the most useful tasks first train a better YOLO than annotating at random?

Per data seed, in one child process (``python -m bench.active --child``, so torch loads once per seed):
a YOLO trained from scratch on a few seed images (plain backgrounds only) scores a pool of unlabelled
images (half plain, half noisy backgrounds with more objects: the shift a real project meets) with
every variant of :mod:`backend.serving.usefulness`; then, for each strategy (the top-ranked tasks of
``least_confidence``, ``band`` and ``combined``: ``margin`` alone is not trained, to fit the time budget; and
random tasks of the same pool), the seed model is fine-tuned on the seed images plus the
20 (then 40) chosen tasks with their true labels, as the training job fine-tunes the current model,
and scored on held-out images of both kinds (mAP50, pycocotools through ``backend.evaluation.metrics``).
The mean over seeds decides which variant serves (``usefulness.DEFAULT_VARIANT``); the curve is a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, TRAIN_ENV, Context, setup_environment
from bench.results import Result, Row

NAME = "active"
TITLE = "12. Active learning: held-out mAP50 after annotating the top-ranked vs random tasks"
IMGSZ = 160
SIZE = (160, 120)


def _params(quick: bool) -> dict:
    if quick:
        return {"seeds": [0], "n_seed": 8, "n_pool": 40, "n_val": 16, "budgets": [8], "seed_epochs": 10,
                "tune_epochs": 3, "strategies": ["random", "least_confidence"]}
    return {"seeds": [0, 1, 2], "n_seed": 12, "n_pool": 100, "n_val": 40, "budgets": [20, 40], "seed_epochs": 60,
            "tune_epochs": 6, "strategies": ["random", "least_confidence", "band", "combined"]}


# --- the child: one data seed ----------------------------------------------------------------------

def _images(seed: int, p: dict):
    from tests.synthetic import make_images

    half_pool, half_val = p["n_pool"] // 2, p["n_val"] // 2
    seed_set = make_images(p["n_seed"], seed=1000 + seed, size=SIZE, max_objects=2)
    pool = (make_images(half_pool, seed=2000 + seed, size=SIZE, max_objects=2)
            + make_images(p["n_pool"] - half_pool, seed=3000 + seed, size=SIZE, noisy=True, max_objects=4))
    val = (make_images(half_val, seed=4000 + seed, size=SIZE, max_objects=2)
           + make_images(p["n_val"] - half_val, seed=5000 + seed, size=SIZE, noisy=True, max_objects=4))
    return seed_set, pool, val


def _truth(item):
    from backend.core.detections import Detections

    return Detections([b.xyxy for b in item.boxes], [b.label for b in item.boxes], [1.0] * len(item.boxes),
                      (item.width, item.height), "truth")


def _map50(checkpoint: Path, val, config, classes) -> float:
    from backend.detectors.yolo import YoloDetector
    from backend.evaluation.metrics import detection_metrics

    detector = YoloDetector(checkpoint, "bench")
    pairs = [(detector.detect_batch([item.image], config, 0.001)[0], _truth(item)) for item in val]
    return float(detection_metrics(pairs, classes, max_det=detector.max_det).map50 or 0.0)


def _train(work: Path, name: str, train_items, val, epochs: int, start: Path | None) -> Path:
    from backend.core.settings import Settings
    from bench.fixtures import write_yolo_dataset
    from worker.training.trainer import train

    data = write_yolo_dataset(work / name, train_items, val[:4])
    settings = Settings(data_dir=str(work / "data"), yolo_base_model="yolo11n.yaml", train_imgsz=IMGSZ, train_batch=8,
                        train_epochs=epochs, train_min_steps=0, train_time_limit_min=0)
    result = train(data, settings, current_checkpoint=start, progress=None, val=False)
    return Path(result.checkpoint)


def child(seed: int, p: dict, work: Path) -> dict:
    """Every strategy and budget for one data seed: mAP50s, ranking scores, seconds."""
    setup_environment()
    from backend.core.label_config import ProjectConfig, config_from_labels
    from backend.detectors.yolo import YoloDetector
    from backend.serving import usefulness
    from tests.synthetic import DEFAULT_CLASSES

    started = time.monotonic()
    classes = list(DEFAULT_CLASSES)
    config = ProjectConfig.parse(config_from_labels(classes))
    seed_set, pool, val = _images(seed, p)
    seed_ckpt = _train(work, "seed", seed_set, val, p["seed_epochs"], None)
    out = {"seed": seed, "seed_map50": _map50(seed_ckpt, val, config, classes), "runs": {}, "seed_train_s": 0.0}
    out["seed_train_s"] = round(time.monotonic() - started, 1)
    detector = YoloDetector(seed_ckpt, "seed")
    views = [detector.detect_batch([item.image], config, usefulness.FLOOR)[0] for item in pool]
    threshold = 0.25
    orders = {"random": random.Random(seed).sample(range(len(pool)), len(pool))}
    for variant in usefulness.VARIANTS:
        scores = [usefulness.usefulness(view, threshold, variant=variant) for view in views]
        orders[variant] = usefulness.rank(scores)
    noisy_first = {name: sum(i >= p["n_pool"] // 2 for i in order[:max(p["budgets"])]) for name, order in orders.items()}
    out["noisy_share_of_top"] = {k: v / max(p["budgets"]) for k, v in noisy_first.items()}
    for strategy in p["strategies"]:
        for budget in p["budgets"]:
            t = time.monotonic()
            chosen = [pool[i] for i in orders[strategy][:budget]]
            ckpt = _train(work, f"{strategy}-{budget}", seed_set + chosen, val, p["tune_epochs"], seed_ckpt)
            out["runs"][f"{strategy}:{budget}"] = {"map50": _map50(ckpt, val, config, classes),
                                                   "seconds": round(time.monotonic() - t, 1)}
            print(json.dumps({"seed": seed, "strategy": strategy, "budget": budget, **out["runs"][f"{strategy}:{budget}"]}),
                  file=sys.stderr, flush=True)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


# --- the parent: seeds, table, curve ---------------------------------------------------------------

def _curve(path: Path, p: dict, means: dict[str, dict[int, float]], seed_map: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in p["strategies"]:
        xs = [0] + list(p["budgets"])
        ax.plot(xs, [seed_map] + [means[strategy][b] for b in p["budgets"]], marker="o",
                linestyle="--" if strategy == "random" else "-", label=strategy)
    ax.set_xlabel("tasks annotated from the pool")
    ax.set_ylabel(f"held-out mAP50 (mean of {len(p['seeds'])} seeds)")
    ax.set_title("Most useful tasks first vs random")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(ctx: Context) -> Result:
    p = _params(ctx.quick)
    result = Result(NAME, TITLE, params={k: v for k, v in p.items()} | {"imgsz": IMGSZ, "image": f"{SIZE[0]}x{SIZE[1]}"})
    seeds = []
    for seed in p["seeds"]:
        work = ctx.tmp(f"active-{seed}")
        out = work / "result.json"
        ctx.log(f"active: seed {seed}")
        cmd = [sys.executable, "-m", "bench.active", "--child", "--seed", str(seed), "--out", str(out),
               "--params", json.dumps(p), "--work", str(work)]
        with open(work / "child.log", "wb") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **TRAIN_ENV}, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=3600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"active child (seed {seed}) failed; log {work / 'child.log'}:\n"
                               f"{(work / 'child.log').read_text()[-2000:]}")
        seeds.append(json.loads(out.read_text()))
        ctx.log(f"active: seed {seed} done in {seeds[-1]['seconds']:.0f} s: {seeds[-1]['runs']}")
    result.raw["seeds"] = seeds
    seed_map = sum(s["seed_map50"] for s in seeds) / len(seeds)
    means = {st: {b: sum(s["runs"][f"{st}:{b}"]["map50"] for s in seeds) / len(seeds) for b in p["budgets"]}
             for st in p["strategies"]}
    ranked = [st for st in p["strategies"] if st != "random"]
    best = max(ranked, key=lambda st: sum(means[st].values()))
    for st in p["strategies"]:
        for b in p["budgets"]:
            per_seed = ", ".join(f"{s['runs'][f'{st}:{b}']['map50']:.3f}" for s in seeds)
            wins = sum(s["runs"][f"{st}:{b}"]["map50"] > s["runs"][f"random:{b}"]["map50"] for s in seeds)
            result.add(Row(f"{st}, {b} tasks", f"{means[st][b]:.3f}", baseline=f"random: {means['random'][b]:.3f}",
                           ratio=f"{means[st][b] - means['random'][b]:+.3f}",
                           note=f"per seed {per_seed}" + ("" if st == "random" else f"; beats random in {wins}/{len(seeds)}")))
    result.add(Row("seed model (before annotating)", f"{seed_map:.3f}",
                   note=f"{p['n_seed']} plain images, {p['seed_epochs']} epochs"))
    share = {st: sum(s["noisy_share_of_top"][st] for s in seeds) / len(seeds) for st in ["random", *ranked]}
    result.add(Row(f"share of noisy-background tasks in the top {max(p['budgets'])}",
                   ", ".join(f"{st} {100 * v:.0f}%" for st, v in share.items())))
    result.raw["means"] = {st: {str(b): v for b, v in m.items()} for st, m in means.items()}
    result.raw["best_variant"] = best
    png = ROOT / "docs" / "active-learning.png"
    if not ctx.quick:
        _curve(png, p, means, seed_map)
    else:
        _curve(ctx.workdir / "active-learning.png", p, means, seed_map)
    result.notes.append(f"Best variant by mean mAP50 over budgets: {best}. Curve: docs/active-learning.png.")
    result.method = __doc__.split("\n\n", 1)[1].strip()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    out = child(args.seed, json.loads(args.params), Path(args.work))
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
