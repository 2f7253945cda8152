"""Annotation efficiency: held-out mAP50 of the promoted YOLO after one training on n corrected images.

Every point runs the real pipeline: Label Studio-shaped tasks (human annotations, Gemini-sourced drafts)
go through ``worker.training.dataset.build_dataset`` (with ``worker.training.drafts.select_drafts`` for
the drafts of the unannotated tasks), ``worker.training.trainer.train`` (in ``bench.train_child``) and
the gate's ``held_out_metrics`` / ``draft_quality`` (pycocotools, ``backend.evaluation.metrics``);
``backend.serving.quality.yolo_preferred`` says whether ``ROUTING=auto`` would then serve YOLO first.
Task ids are chosen so that the pipeline's own hash split puts exactly the same held-out tasks in val at
every size: the model and the drafts are scored on the same human-labelled tasks.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import CLASSES, ROOT, TRAIN_ENV, Context, package_version, project_id
from bench.fixtures import cached_training, synthetic, train_in_subprocess
from bench.results import Result, Row, goal_row

NAME = "curve"
TITLE = "11. Annotation efficiency: one training on n corrected images vs the drafts"
PNG = ROOT / "bench" / "results" / "annotation_efficiency.png"
#: Simulated Gemini drafts (tests/synthetic.py:perturb): box jitter (share of the box side), missed boxes, a spurious box.
DRAFT_NOISE = {"jitter": 0.08, "drop": 0.15, "extra": 0.4}
HELD_OUT = 24
POOL = 80  # unannotated tasks with drafts (pseudo-labels)


def _ids(project: str, count: int, low: float, high: float, start: int, taken: set[int]) -> list[int]:
    """``count`` task ids whose split hash falls in [low, high): in val (< TRAIN_VAL_FRACTION) or never."""
    from worker.training.dataset import task_fraction

    out, i = [], start
    while len(out) < count:
        if i not in taken and low <= task_fraction(project, i) < high:
            out.append(i)
            taken.add(i)
        i += 1
    return out


class _Images:
    """In-memory image source with the ImageLoader interface (``load(url, task_id)``)."""

    def __init__(self, images: dict[str, object]):
        self.images = images

    def load(self, url: str, task_id: int | None = None):
        from backend.core.images.loader import LoadedImage

        image = self.images[url]
        return LoadedImage(image, image.width, image.height, url, b"")


def project(seed: int, n_max: int, size: tuple[int, int]) -> dict:
    """One synthetic project: n_max corrected + HELD_OUT held-out tasks (with drafts) and a POOL of drafted tasks."""
    import numpy as np

    from backend.core.label_studio import AnnotatedTask, DraftedTask, StoredPrediction
    from tests.synthetic import draft_result, ls_result, perturb

    pid = project_id()
    rng = np.random.default_rng(1000 + seed)
    images = synthetic(n_max + HELD_OUT + POOL, seed=seed, size=size)
    taken: set[int] = set()
    held = _ids(pid, HELD_OUT, 0.0, 0.15, 1, taken)
    corrected = _ids(pid, n_max, 0.5, 1.0, 1, taken)
    pool = _ids(pid, POOL, 0.2, 1.0, 1, taken)
    urls, tasks, drafted = {}, {}, []
    for i, (tid, im) in enumerate(zip([*corrected, *held, *pool], images)):
        url = f"mem://{seed}/{tid}.png"
        urls[url] = im.image
        draft = StoredPrediction(tid, "gemini-2.5-flash", None,
                                 draft_result(perturb(im.boxes, rng, im.width, im.height, **DRAFT_NOISE), im.width,
                                              im.height, source="gemini"), f"2026-01-01T00:00:{i % 60:02d}")
        if tid in pool:
            drafted.append(DraftedTask(tid, {"image": url}, (draft,)))
        else:
            tasks[tid] = AnnotatedTask(tid, {"image": url}, tid, "t", ls_result(im.boxes, im.width, im.height), (draft,))
    return {"project": pid, "corrected": corrected, "held": held, "tasks": tasks, "drafted": drafted,
            "loader": _Images(urls)}


def pretrained_standin(ctx: Context, imgsz: int) -> Path:
    """A checkpoint pretrained on a DIFFERENT synthetic set (noisy backgrounds, other seed): the stand-in for COCO weights."""
    from tests.synthetic import make_images

    params = {"n": ctx.pick(200, 16), "time_min": ctx.pick(3.0, None), "epochs": ctx.pick(None, 1), "imgsz": imgsz,
              "ultralytics": package_version("ultralytics"), "v": 1}
    return cached_training(ctx, "standin", params,
                           lambda: make_images(params["n"], seed=777, size=(320, 240), noisy=True), train_share=0.85)


def one_point(ctx: Context, proj: dict, n: int, drafts: bool, base: str, budget: dict) -> dict:
    """Build the dataset (n corrected + held-out, drafts or not), train once, score as the gate does."""
    from backend.core.label_config import ProjectConfig
    from backend.core.registry import VersionInfo
    from backend.core.settings import Settings
    from backend.serving.quality import yolo_preferred
    from tests.synthetic import label_config
    from worker.training.dataset import build_dataset
    from worker.training.drafts import select_drafts
    from worker.training.gate import draft_quality, gate, held_out_metrics

    work = ctx.tmp(f"curve-{n}")
    settings = Settings(data_dir=work, model_dir=work / "models", train_drafts=drafts, train_time_limit_min=0)
    config = ProjectConfig.parse(label_config(CLASSES))
    tasks = [proj["tasks"][t] for t in [*proj["corrected"][:n], *proj["held"]]]
    selection = select_drafts(proj["drafted"], None, settings.train_draft_min_score) if drafts else None
    dataset = build_dataset(proj["project"], tasks, config, settings, loader=proj["loader"], drafts=selection, threads=2)
    assert sorted(i.task_id for i in dataset.val_items) == sorted(proj["held"]), "held-out split moved"
    r = train_in_subprocess(dataset.data_yaml, work / "r.json", work / "train.log", data_dir=work, env=TRAIN_ENV,
                            base_model=base, **budget)
    metrics = held_out_metrics(r["checkpoint"], dataset, config)
    quality = draft_quality(tasks, dataset.val_items, config)
    decision = gate(metrics, None, settings.promote_min_gain)
    meta = {"metrics": metrics, "draft_quality": quality}
    return {"n": n, "drafts": drafts, "base": base, "map50": metrics["map50"], "map50_95": metrics["map50_95"],
            "drafts_map50": quality.get("gemini", {}).get("map50"), "promoted": decision.promote,
            "yolo_preferred": yolo_preferred(VersionInfo(proj["project"], "v0001", work, meta)),
            "train_images": dataset.counts["train"], "draft_tasks": dataset.counts["draft_tasks"],
            "wall_s": round(r["wall_s"], 1), "epochs_run": r["epochs_run"], "train_args": r["train_args"]}


def series(points: list[dict]) -> dict[tuple[str, bool, str], list[dict]]:
    """The plot's lines: points grouped by (start, drafts, budget), each sorted by n; no line joins two budgets."""
    lines: dict[tuple[str, bool, str], list[dict]] = {}
    for point in sorted(points, key=lambda p: p["n"]):
        lines.setdefault((point["start"], point["drafts"], str(point["budget"])), []).append(point)
    return lines


def _plot(points: list[dict], drafts_map: float, path: Path, title: str, real: dict) -> None:
    """One line per (start, drafts, budget): points trained at different budgets are never joined, so a line shows n only.

    Points at the real defaults' budget are filled, points at a shorter budget hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines = [(start, drafts) for start in ("random", "pretrained") for drafts in (True, False)]
    colours = dict(zip(lines, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (start, drafts, budget), rows in sorted(series(points).items(), key=lambda kv: (lines.index(kv[0][:2]), kv[0][2])):
        full = budget == str(real)
        ax.errorbar([p["n"] for p in rows], [p["mean"] for p in rows], yerr=[p["sd"] for p in rows],
                    fmt=f"{'-' if drafts else '--'}{'o' if start == 'random' else 's'}", color=colours[start, drafts],
                    capsize=3, markerfacecolor=colours[start, drafts] if full else "none", markersize=9 if full else 6,
                    zorder=4 if full else 2, label=f"YOLO, {start} start, {'with' if drafts else 'without'} drafts, {budget}")
    ax.axhline(drafts_map, color="grey", linestyle=":", label=f"Gemini drafts (simulated) {drafts_map:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("corrected images")
    ax.set_ylabel("held-out mAP50")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"{title}\nfilled: the real budget {real}; hollow: a shorter budget", fontsize=8)
    ax.legend(fontsize=6, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summarise(result: Result, runs: list[dict], sizes: list[int], headline: int, real: dict | None = None) -> list[dict]:
    """The table and goal rows of the runs so far: written after every seed, so an interrupted run keeps them.

    Goal rows are given only for headline runs at the ``real`` budget (all headline runs when ``real`` is None).
    """
    result.rows = []
    points = []
    for start in ("random", "pretrained"):
        for drafts in (True, False):
            for n in sizes:
                rs = [r for r in runs if r["start"] == start and r["drafts"] == drafts and r["n"] == n]
                if not rs:
                    continue
                vals = [r["map50"] for r in rs]
                points.append({"start": start, "drafts": drafts, "n": n, "mean": statistics.mean(vals),
                               "sd": statistics.pstdev(vals), "budget": rs[0]["budget"]})
                ours = statistics.mean(r["drafts_map50"] for r in rs)
                result.add(Row(f"{n} corrected, {start} start{' (stand-in, see method)' if start == 'pretrained' else ''}, "
                               f"{'with' if drafts else 'without'} drafts: held-out mAP50",
                               f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f} (n={len(vals)})",
                               baseline=f"drafts {ours:.3f}", ratio=f"{statistics.mean(vals) / max(ours, 1e-9):.2f}×",
                               note=f"budget {rs[0]['budget']}, {statistics.mean(r['epochs_run'] for r in rs):.0f} epochs, "
                                    f"{statistics.mean(r['wall_s'] for r in rs):.0f} s, "
                                    f"{statistics.mean(r['train_images'] for r in rs):.0f} train images"))
    head = [r for r in runs if r["n"] == headline and r["start"] == "random"
            and (real is None or str(r["budget"]) == str(real))]
    for drafts in (True, False):
        hs = [r for r in head if r["drafts"] == drafts]
        if not hs:
            continue
        beat = sum(r["map50"] > r["drafts_map50"] for r in hs)
        routed = sum(r["yolo_preferred"] for r in hs)
        label = f"{headline} corrected, random init, {'with' if drafts else 'without'} drafts, real defaults"
        result.add(goal_row(f"{label}: YOLO beats the drafts (seeds)", f"{beat}/{len(hs)}", beat / len(hs), 1.0, True,
                            "every seed"))
        result.add(goal_row(f"{label}: new tasks ROUTING=auto sends to YOLO (yolo_preferred, per project)",
                            f"{100 * routed / len(hs):.0f}%", routed / len(hs), 0.9, True, "≥ 90%"))
    return points


def budget_notes(runs: list[dict], real: dict) -> list[str]:
    """What each budget bought per start, so a line that mixes budgets is not read as an effect of n."""
    notes = []
    for start in ("random", "pretrained"):
        groups: dict[str, list[dict]] = {}
        for r in runs:
            if r["start"] == start:
                groups.setdefault(str(r["budget"]), []).append(r)
        if len(groups) < 2:
            continue
        parts = []
        for budget, rs in groups.items():
            mean = statistics.mean(r["map50"] for r in rs)
            sizes = ", ".join(str(n) for n in sorted({r["n"] for r in rs}))
            part = (f"at {budget} mean mAP50 {mean:.3f} over {len(rs)} runs (sizes {sizes}, "
                    f"{statistics.mean(r['epochs_run'] for r in rs):.0f} epochs on average)")
            if budget != str(real) and mean < 0.1:
                part += ": too short to learn anything from these weights, so those points measure the budget, not n"
            parts.append(part)
        notes.append(f"{start} start: " + "; ".join(parts) + ".")
    return notes


def run(ctx: Context) -> Result:
    from backend.core.settings import Settings

    defaults = Settings(train_time_limit_min=Settings.model_fields["train_time_limit_min"].default)
    sizes = ctx.pick([10, 20, 40, 80], [4])
    seeds = ctx.pick([1, 2, 3], [1])
    headline = ctx.pick(40, 4)
    short = ctx.pick({"time_min": 0.25}, {"epochs": 1, "imgsz": 64})
    real = ctx.pick({"time_min": defaults.train_time_limit_min}, {"epochs": 1, "imgsz": 64})
    imgsz = ctx.pick(defaults.train_imgsz, 64)
    result = Result(NAME, TITLE, params={
        "sizes": sizes, "seeds": len(seeds), "held_out": HELD_OUT, "unannotated_pool": POOL, "draft_noise": DRAFT_NOISE,
        f"budget at {headline} images, random init, with drafts": real, "budget elsewhere": short,
        "TRAIN_BATCH": defaults.train_batch, "TRAIN_IMGSZ": defaults.train_imgsz,
        "TRAIN_DRAFT_MAX_SHARE": defaults.train_draft_max_share, "OMP_WAIT_POLICY": "PASSIVE"})
    standin = str(pretrained_standin(ctx, imgsz))
    runs: list[dict] = []
    for seed in seeds:
        proj = project(seed, max(sizes), (320, 240))
        for n in sizes:
            for start, base in (("random", "yolo11n.yaml"), ("pretrained", standin)):
                for drafts in (True, False):
                    if ctx.quick and (start == "pretrained") == drafts:  # quick: 2 of the 4 lines, one point each
                        continue
                    # The goal's point runs the real defaults (TRAIN_DRAFTS on); the rest a shorter budget, so
                    # `make bench` stays near an hour.
                    budget = real if (n == headline and start == "random" and drafts) else short
                    ctx.log(f"curve: seed {seed}, {n} images, {start}, drafts {drafts}, {budget}")
                    point = one_point(ctx, proj, n, drafts, base, budget)
                    point.update(seed=seed, start=start, budget=budget)
                    runs.append(point)
                    ctx.log(f"curve: mAP50 {point['map50']:.3f} (drafts {point['drafts_map50']}) in {point['wall_s']} s")
        result.raw = {"runs": runs}
        points = _summarise(result, runs, sizes, headline, real)
        ctx.partial(result)
    drafts_map = statistics.mean(r["drafts_map50"] for r in runs if r["drafts_map50"] is not None)
    result.notes.extend(budget_notes(runs, real))
    png = PNG if not ctx.quick else ctx.workdir / PNG.name
    _plot(points, drafts_map, png, f"held-out mAP50 after one training, mean ± sd over {len(seeds)} seed(s)", real)
    result.raw = {"runs": runs, "points": points, "png": str(png)}
    rel = png.relative_to(ROOT) if png.is_relative_to(ROOT) else png
    result.notes.append(f"Plot: ![annotation efficiency]({rel})")
    result.method = (
        f"Per seed one synthetic project (tests/synthetic.py shapes, 320×240): {max(sizes)} tasks to correct, {HELD_OUT} "
        f"held out, {POOL} never annotated; every task has a simulated Gemini draft (perturb: {DRAFT_NOISE}). A point builds "
        "the dataset with the first n corrected tasks plus the held-out ones through worker.training.dataset.build_dataset "
        "(drafts of the unannotated tasks via select_drafts, capped by TRAIN_DRAFT_MAX_SHARE), trains once with "
        "worker.training.trainer.train in bench.train_child at the defaults (TRAIN_BATCH, TRAIN_IMGSZ, nbs = batch) and "
        "the budget shown, and scores the candidate with the gate's held_out_metrics; the drafts' mAP50 is the gate's "
        "draft_quality on the same held-out tasks. 'pretrained' starts from a checkpoint trained on a DIFFERENT synthetic "
        "set (noisy backgrounds, 200 images, 3 min) — a stand-in for COCO weights, which cannot be downloaded here. "
        f"Only the {headline}-image random-init point with drafts runs the real defaults (TRAIN_DRAFTS on, the default "
        "TRAIN_TIME_LIMIT_MIN); every other point a shorter budget, to keep `make bench` near an hour, so a hollow point "
        "measures what that budget buys, not what the defaults would.")
    return result
