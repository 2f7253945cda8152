"""``lsb train``: train YOLO on a local dataset folder, or run a Label Studio project's training.

    lsb train --data dataset/ --epochs 30 --out helmet.pt                 # any YOLO dataset (data.yaml)
    lsb train --data dataset/ --register 3 --promote                      # ... and serve it for project 3
    lsb train --project 3 --now                                           # the worker's job, in this process
    lsb train --project 3                                                 # queue it for the RQ worker

``--data``: :func:`worker.training.trainer.train` (offline Ultralytics, nbs = batch, all cores, the TRAIN_*
settings unless overridden here), then the new checkpoint is scored on the dataset's val split
with :func:`backend.evaluation.metrics.evaluate` (``--report DIR`` writes the Markdown report). With
``--register PROJECT`` the checkpoint becomes a registry version of that project (classes, metrics
and training arguments in its meta.json); ``--promote`` also makes it current (every serving
process hot-swaps). ``--from model.pt`` fine-tunes a checkpoint instead of YOLO_BASE_MODEL (whose weights
are obtained as for the worker's trainings: README, Pretrained start; ``base_model`` in the output says how).
``--project``: runs ``python -m worker.cli.admin train`` (reads the annotations from Label Studio, builds
the dataset, trains, gates and promotes only a better model).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from backend.core.keys import project_key
from backend.core.label_config import ProjectConfig
from backend.core.registry import ModelRegistry
from backend.detectors.yolo import YoloDetector
from backend.evaluation.truth import load_yolo, read_data_yaml
from worker.cli import common
from worker.training.trainer import train


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train YOLO on a local dataset, or a Label Studio project's training",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=Path, help="YOLO dataset folder or its data.yaml")
    what.add_argument("--project", help="Label Studio project id: the backend's training job")
    p.add_argument("--now", action="store_true", help="--project: train in this process instead of queueing")
    p.add_argument("--no-force", action="store_true", help="--project: skip when no annotation changed")
    p.add_argument("--epochs", type=int,
                   help="run exactly this many (default TRAIN_EPOCHS, raised by TRAIN_MIN_STEPS from scratch)")
    p.add_argument("--imgsz", type=int, help="default TRAIN_IMGSZ")
    p.add_argument("--batch", type=int, help="default TRAIN_BATCH")
    p.add_argument("--time-min", type=float, help="wall-time budget in minutes (default TRAIN_TIME_LIMIT_MIN)")
    p.add_argument("--from", dest="start_from", type=Path, help="fine-tune this .pt instead of starting from YOLO_BASE_MODEL")
    p.add_argument("--out", type=Path, help="copy the trained checkpoint here (default ./<dataset>-yolo.pt)")
    p.add_argument("--report", type=Path, help="write the val-split evaluation report into this folder")
    p.add_argument("--register", metavar="PROJECT", help="add the checkpoint to this project's model registry")
    p.add_argument("--promote", action="store_true", help="with --register: make it the current version")
    common.common_flags(p)
    p.set_defaults(run=run)


def _project(args) -> int:
    from worker.cli import admin as worker_cli  # lazy: admin imports worker.jobs.training (pycocotools), too slow for lsb --help

    common.settings()
    argv = ["train", "--project", str(args.project)]
    if args.now:
        argv.append("--now")
    if args.no_force:
        argv.append("--no-force")
    return worker_cli.main(argv)


def evaluate_checkpoint(checkpoint: Path, data: Path, s, split: str = "val", report: Path | None = None,
                        quiet: bool = True) -> dict:
    """Score a checkpoint on a YOLO dataset split (the ``lsb eval`` code path)."""
    from backend.evaluation.metrics import evaluate  # heavy: pycocotools, kept out of lsb --help
    from backend.evaluation.report import write_report  # heavy: imports metrics (pycocotools)

    truth = load_yolo(data, split=split)
    config = ProjectConfig.parse(common.config_from_labels(truth.classes))
    detector = YoloDetector(checkpoint, checkpoint.stem, device=s.yolo_device, threads=s.yolo_threads)
    images = common.Images(s)
    pairs, latencies = [], []
    started = time.perf_counter()
    for t in truth.images:
        loaded = images.load(common.ImageItem(t.name, t.path))
        t0 = time.perf_counter()
        pairs.append((detector.detect_batch([loaded.image], config, 0.001)[0], t.truth))
        latencies.append(time.perf_counter() - t0)
    metrics = evaluate(pairs, truth.classes, latencies=latencies, wall_seconds=time.perf_counter() - started,
                       score_threshold=config.score_threshold(s.yolo_score_threshold))
    if report is not None:
        write_report(metrics, report, title=f"{checkpoint.name} on {Path(truth.origin).parent.name} ({split})",
                     about={"model": str(checkpoint), "truth": truth.origin})
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.project:
        return _project(args)

    s = common.settings()
    data = args.data if args.data.suffix.lower() in (".yaml", ".yml") else next(
        (args.data / n for n in ("data.yaml", "dataset.yaml") if (args.data / n).is_file()), None)
    if data is None or not data.is_file():
        raise common.CLIError(f"{args.data} is not a YOLO dataset (no data.yaml)")
    if args.start_from and not args.start_from.is_file():
        raise common.CLIError(f"--from {args.start_from} does not exist")
    _, classes = read_data_yaml(data)
    updates = {k: v for k, v in (("train_epochs", args.epochs), ("train_imgsz", args.imgsz), ("train_batch", args.batch),
                                 ("train_time_limit_min", args.time_min)) if v is not None}
    if args.epochs is not None:  # an explicit --epochs is run as given: TRAIN_MIN_STEPS does not raise it
        updates["train_min_steps"] = 0
    if updates:
        s = s.model_copy(update=updates)

    bar = tqdm(total=int(s.train_epochs), desc="train", unit="epoch", disable=args.quiet, file=sys.stderr)

    def progress(update: dict) -> None:
        bar.total = int(update.get("epochs") or bar.total)
        bar.n = int(update.get("epoch") or 0)
        metrics = update.get("metrics") or {}
        map50 = metrics.get("metrics/mAP50(B)")
        if map50 is not None:
            bar.set_postfix(mAP50=f"{map50:.3f}")
        bar.refresh()

    try:
        result = train(data, s, current_checkpoint=args.start_from, progress=progress)
    finally:
        bar.close()
    out = args.out or Path(f"{data.parent.name}-yolo.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.checkpoint, out)
    metrics = evaluate_checkpoint(out, data, s, report=args.report, quiet=args.quiet)
    summary = {"checkpoint": str(out.resolve()), "classes": classes, "epochs_run": result.epochs_run, "seconds": result.seconds,
               "fine_tuned": result.fine_tuned, "start_from": result.start_from, "base_model": result.base_model,
               "val": {"map50_95": metrics["coco"]["map50_95"], "map50": metrics["coco"]["map50"],
                       "precision": metrics["gate"]["precision"], "recall": metrics["gate"]["recall"],
                       "images": metrics["n_images"]}}
    if args.report:
        summary["report"] = str((args.report / "report.md").resolve())
    if args.register:
        registry = ModelRegistry(s.model_dir, common.redis_or_none(s))
        gate = metrics["gate"]
        meta = {"classes": classes, "parent": None, "dataset": {"data_yaml": str(data.resolve())},
                "metrics": {"map50": gate["map50"], "map50_95": gate["map50_95"], "precision": gate["precision"],
                            "recall": gate["recall"], "n_images": metrics["n_images"], "n_gt": metrics["n_gt"]},
                "coco_metrics": metrics["coco"], "train": result.to_meta() | {"checkpoint": None},
                "imgsz": int(result.train_args.get("imgsz", s.train_imgsz)), "origin": "lsb train --data"}
        info = registry.add_version(project_key(args.register), out, meta)
        summary["registered"] = {"project": info.project, "version": info.version, "path": str(info.path)}
        if args.promote:
            registry.promote(info.project, info.version)
            summary["registered"]["current"] = True
    Path(result.checkpoint).unlink(missing_ok=True)
    common.print_json(summary)
    return 0
