"""Train YOLO offline (``backend.core.ultralytics_env``) and hand back a checkpoint outside ``runs/``.

Starting point: the project's current promoted checkpoint when there is one (fine-tuning keeps its
weights: ``pretrained`` is left alone), else ``YOLO_BASE_MODEL`` as :mod:`worker.training.base_model`
resolves it: pretrained weights (a local ``.pt``, or official weights obtained once into
``MODEL_DIR/base``), fine-tuned like a checkpoint, or a model yaml (random init; weights that cannot
be had fall back to the yaml of the same stem, ``yolo11n.pt`` -> ``yolo11n.yaml``, with a warning).
``YOLO()`` is only ever given a local file or a yaml, so it never downloads.

Settings used: ``TRAIN_TIME_LIMIT_MIN`` (default 5: Ultralytics' ``time=`` in hours, which sets the epoch
count and the LR schedule to fill the budget), ``TRAIN_EPOCHS`` (only without a time limit; raised by
``TRAIN_MIN_STEPS`` from random init, see :func:`epochs_for`), ``TRAIN_IMGSZ`` (320), ``TRAIN_BATCH``
(8; ``nbs`` = batch, so every batch is an optimizer step: on 40 images in 5 CPU-minutes batch 8 reached
held-out mAP50 0.996 where 16 reached 0.891 and imgsz 416 0.950, BENCHMARKS.md "Annotation efficiency"),
``TRAIN_DEVICE`` (``auto``: :func:`resolve_device`), ``TRAIN_FREEZE`` (only from pretrained .pt weights:
:func:`freeze_layers`). Ultralytics' augmentation defaults are kept (mosaic,
off for the last ``close_mosaic`` = 10 epochs). Always ``amp=False`` on CPU, ``workers=0``, ``plots=False``,
``project=`` a temporary folder under ``DATA_DIR/runs`` (deleted afterwards), and torch threads =
all cores (Ultralytics would use ``cpu_count - 1``). Progress goes to the current RQ job's meta
(``progress``) at every ``on_fit_epoch_end``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from backend.core import ultralytics_env
from backend.core.files import copy_atomic
from backend.core.progress import report_progress
from worker.training.base_model import BaseModel, obtain_base_model

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    checkpoint: Path  # the copied best.pt (outside runs/)
    start_from: str
    fine_tuned: bool
    epochs_run: int
    seconds: float
    train_args: dict
    final_metrics: dict = field(default_factory=dict)  # Ultralytics' own validation of best.pt
    history: list[dict] = field(default_factory=list)
    base_model: dict | None = None  # BaseModel.to_status() when it started from YOLO_BASE_MODEL, else None

    def to_meta(self) -> dict:
        data = asdict(self)
        data["checkpoint"] = str(self.checkpoint)
        return data


class StartPoint(NamedTuple):
    model: str  # what YOLO() loads: a local .pt or a model yaml
    fine_tune: bool  # starts from trained weights (pretrained is left alone)
    base: BaseModel | None  # how YOLO_BASE_MODEL was resolved; None when fine-tuning the current checkpoint


def resolve_start(settings, current_checkpoint: Path | str | None) -> StartPoint:
    """Where this training starts, following the rules in the module docstring."""
    if current_checkpoint and Path(current_checkpoint).is_file():
        return StartPoint(str(current_checkpoint), True, None)
    base = obtain_base_model(settings)
    return StartPoint(base.used, base.pretrained, base)


def train_images(data_yaml: Path | str) -> int:
    """How many training images a data.yaml points at (its ``train`` folder, as Ultralytics reads it)."""
    data = yaml.safe_load(Path(data_yaml).read_text()) or {}
    root = Path(data.get("path") or Path(data_yaml).parent)
    entries = data.get("train") or []
    folders = [root / entry for entry in ([entries] if isinstance(entries, str) else entries)]
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    return sum(1 for folder in folders if folder.is_dir() for f in folder.rglob("*") if f.suffix.lower() in suffixes)


def epochs_for(settings, n_train: int, fine_tune: bool) -> int:
    """``TRAIN_EPOCHS``, raised from random init until the run makes ``TRAIN_MIN_STEPS`` optimizer steps.

    With nbs = batch every batch is one step: 40 images at batch 16 are 3 steps an epoch, and 30
    epochs of them (90 steps) from random init learned nothing (held-out mAP50 0.006, BENCHMARKS.md
    section 7) where 150-240 steps reached 0.99. Raising epochs for small sets keeps the images seen
    (about steps x batch) and so the time roughly constant. Fine-tuning starts from a working model
    and keeps ``TRAIN_EPOCHS``.
    """
    epochs = int(settings.train_epochs)
    if fine_tune or settings.train_min_steps <= 0 or n_train <= 0:
        return epochs
    steps_per_epoch = math.ceil(n_train / int(settings.train_batch))
    return max(epochs, math.ceil(settings.train_min_steps / steps_per_epoch))


def freeze_layers(settings, base: BaseModel | None) -> int:
    """``TRAIN_FREEZE`` layers when the training starts from pretrained .pt weights (``YOLO_BASE_MODEL``), else 0.

    Freezing keeps generic pretrained features from being overwritten by a few dozen images and makes each step
    cheaper; random-init weights (a yaml) have nothing worth keeping, and the project's own model (``base`` None)
    is already adapted to its images. Measured in BENCHMARKS.md "Freeze"."""
    if base is None or not base.pretrained or not str(base.used).lower().endswith(".pt"):
        return 0
    return int(getattr(settings, "train_freeze", 0) or 0)


def resolve_device(requested: str | None) -> str:
    """``TRAIN_DEVICE``: ``auto`` is ``cuda:0`` when torch sees a GPU on this (worker) host, else ``mps``, else ``cpu``."""
    device = str(requested or "auto").strip()
    if device.lower() != "auto":
        return device
    import torch  # heavy: only when a training resolves its device

    if torch.cuda.is_available():
        return "cuda:0"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _jsonable(values: dict) -> dict:
    out = {}
    for k, v in (values or {}).items():
        try:
            f = float(v)
            out[str(k)] = round(f, 6) if math.isfinite(f) else None
        except (TypeError, ValueError):
            continue
    return out


def train(
    data_yaml: Path | str,
    settings,
    current_checkpoint: Path | str | None = None,
    out_dir: Path | str | None = None,
    progress: ProgressCallback | None = report_progress,
    **overrides: Any,
) -> TrainResult:
    """Train and return the final best checkpoint, copied to ``out_dir`` (default ``DATA_DIR/candidates``).

    ``overrides`` go to ``model.train`` last (tests use them for tiny runs: ``epochs=1``...).
    """
    ultralytics_env.prepare()
    import torch  # heavy: imported when a training starts, not when the worker starts
    from ultralytics import YOLO  # heavy: ultralytics, with torch above

    started = time.monotonic()
    data_dir = Path(settings.data_dir).resolve()
    start_from, fine_tune, base = resolve_start(settings, current_checkpoint)
    runs_root = data_dir / "runs"
    runs_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="train-", dir=runs_root))
    out_dir = Path(out_dir or data_dir / "candidates").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(settings.train_device)
    on_cpu = device.lower() == "cpu"
    batch = int(settings.train_batch)
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": epochs_for(settings, train_images(data_yaml), fine_tune),
        "imgsz": int(settings.train_imgsz),
        "batch": batch,
        "nbs": batch,
        "device": device,
        "workers": 0,
        "project": str(run_dir),
        "name": "run",
        "exist_ok": True,
        "plots": False,
        "verbose": False,
        "seed": 0,
        "deterministic": False,
        "val": True,
    }
    if on_cpu:
        args["amp"] = False
    if settings.train_time_limit_min and settings.train_time_limit_min > 0:
        # Ultralytics' time= is in hours; after every epoch it re-estimates the epoch count that fills the budget
        # and rebuilds the LR schedule for it, so close_mosaic's last epochs and the final LR fall inside the budget
        # (docs/ultralytics.md#time-budget).
        args["time"] = float(settings.train_time_limit_min) / 60.0
    if not fine_tune:
        args["pretrained"] = False
    freeze = freeze_layers(settings, base)
    if freeze:
        args["freeze"] = freeze
    args.update(overrides)

    history: list[dict] = []

    def set_threads(trainer) -> None:
        if on_cpu:
            ultralytics_env.restore_torch_threads()  # select_device() just set cpu_count - 1

    def on_epoch_end(trainer) -> None:
        losses = {}
        try:
            losses = _jsonable(trainer.label_loss_items(trainer.tloss, prefix="train")) if trainer.tloss is not None else {}
        except Exception as exc:  # progress is cosmetic; never let it stop a training
            log.debug("no loss items: %s", exc)
        final = int(trainer.epoch) + 1 > int(trainer.epochs)  # final_eval reports once more, as epoch + 1
        update = {
            "epoch": min(int(trainer.epoch) + 1, int(trainer.epochs)),
            "epochs": int(trainer.epochs),
            "losses": losses,
            "metrics": _jsonable(getattr(trainer, "metrics", {}) or {}),
            "elapsed_s": round(time.monotonic() - started, 1),
            "threads": torch.get_num_threads(),
            "stage": "final_eval" if final else "training",
        }
        history.append(update)
        if progress is not None:
            progress(update)

    log.info("training from %s (%s) with %s", start_from, "fine-tune" if fine_tune else "scratch",
             {k: v for k, v in args.items() if k != "project"})
    try:
        model = YOLO(start_from)
        model.add_callback("on_pretrain_routine_start", set_threads)
        model.add_callback("on_train_start", set_threads)
        model.add_callback("on_fit_epoch_end", on_epoch_end)
        set_threads(None)
        model.train(**args)
        trainer = model.trainer
        best = Path(trainer.best)
        source = best if best.is_file() else Path(trainer.last)
        if not source.is_file():
            raise RuntimeError(f"training finished without a checkpoint in {trainer.save_dir}")
        final_path = out_dir / f"candidate-{int(time.time() * 1000)}-{os.getpid()}.pt"
        copy_atomic(source, final_path)  # training is over: nothing rewrites best.pt now
        final_metrics = _jsonable(getattr(trainer, "metrics", {}) or {})
        epochs_run = int(trainer.epoch) + 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        set_threads(None)  # the final validation's select_device() reset it again
    seconds = time.monotonic() - started
    log.info("training finished in %.1f s, %d epochs, %s", seconds, epochs_run, final_metrics)
    train_args = {k: v for k, v in args.items() if k not in ("project", "data")}
    return TrainResult(final_path, start_from, fine_tune, epochs_run, round(seconds, 2), train_args, final_metrics, history,
                       base_model=base.to_status() if base is not None else None)
