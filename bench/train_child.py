"""One training run in its own process (so its peak RSS can be read): ``worker.training.trainer.train`` as the
RQ job runs it, at the project's default settings unless told otherwise. Writes a JSON result.

Held-out quality is scored like the promotion gate scores it: the serving detector on the val split,
pycocotools through ``backend.evaluation.metrics`` (Ultralytics' own validation is kept beside it).

    python -m bench.train_child --data DATA_YAML --out RESULT_JSON [--epochs N] [--time-min M] ...
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import setup_environment


def held_out(checkpoint: str, data_yaml: str) -> dict:
    """mAP50 / mAP50-95 of the checkpoint on the dataset's val split, through the serving detector."""
    from PIL import Image

    from backend.core.label_config import ProjectConfig, config_from_labels
    from backend.detectors.yolo import YoloDetector
    from backend.evaluation.metrics import detection_metrics
    from backend.evaluation.truth import load_yolo

    truth = load_yolo(data_yaml, split="val")
    config = ProjectConfig.parse(config_from_labels(truth.classes))
    detector = YoloDetector(checkpoint, "bench")
    pairs = []
    for item in truth.images:
        with Image.open(item.path) as image:
            pairs.append((detector.detect_batch([image.convert("RGB")], config, 0.001)[0], item.truth))
    metrics = detection_metrics(pairs, truth.classes, max_det=detector.max_det)
    return {"map50": metrics.map50, "map50_95": metrics.map50_95, "images": metrics.n_images}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--time-min", type=float)
    parser.add_argument("--imgsz", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--extra", default="{}", help="JSON of extra model.train overrides")
    parser.add_argument("--base-model", default="yolo11n.yaml",
                        help="YOLO_BASE_MODEL; random init by default, so runs measure the same start on any host")
    args = parser.parse_args()
    setup_environment()
    from backend.core.settings import Settings
    from worker.training.trainer import train

    changes = {"data_dir": args.data_dir, "yolo_base_model": args.base_model}
    if args.epochs is not None:  # an explicit epoch count is run as given: TRAIN_MIN_STEPS does not raise it
        changes["train_epochs"] = args.epochs
        changes["train_min_steps"] = 0
        changes["train_time_limit_min"] = 0  # ... and no default time budget re-fits it (unless --time-min)
    if args.time_min is not None:
        changes["train_time_limit_min"] = args.time_min
    if args.imgsz is not None:
        changes["train_imgsz"] = args.imgsz
    if args.batch is not None:
        changes["train_batch"] = args.batch
    settings = Settings(**changes)
    started = time.perf_counter()
    result = train(args.data, settings, progress=None, **json.loads(args.extra))
    metrics = result.final_metrics
    epochs = [h for h in result.history if h.get("stage") == "training"]
    if len(epochs) > 1:
        epoch_s = (epochs[-1]["elapsed_s"] - epochs[0]["elapsed_s"]) / (len(epochs) - 1)
    else:
        epoch_s = epochs[0]["elapsed_s"] if epochs else None
    out = {
        "checkpoint": str(result.checkpoint),
        "seconds": result.seconds,
        "train_s": time.perf_counter() - started,
        "epochs_run": result.epochs_run,
        "epoch_s": epoch_s,  # one epoch, training + validation, from Ultralytics' callbacks
        "train_args": result.train_args,
        **held_out(str(result.checkpoint), args.data),
        "ultralytics_map50": metrics.get("metrics/mAP50(B)"),
        "ultralytics_map50_95": metrics.get("metrics/mAP50-95(B)"),
        "final_metrics": metrics,
        "settings": {k: getattr(settings, k) for k in ("train_epochs", "train_min_steps", "train_imgsz", "train_batch",
                                                         "train_time_limit_min")},
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
