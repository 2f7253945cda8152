"""The promotion gate and the quality of stored drafts, both scored by :mod:`backend.evaluation.metrics`.

The gate evaluates the candidate and the current checkpoint the same way on the same held-out
tasks: each predicts the saved val images through the serving detector
(:class:`backend.detectors.yolo.YoloDetector`, model classes mapped to label-config labels by name,
so a model trained under an older label config is still compared fairly), and pycocotools scores
the boxes against the human labels. It promotes when there is no current model or the candidate's
mAP50-95 beats the current's by more than ``PROMOTE_MIN_GAIN``. Both the gate and the draft quality
score human labels only: drafts trained on (``TRAIN_DRAFTS``) never enter the held-out split, and
:func:`human_held_out` refuses one that would.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from backend.control_models.reader import parse_regions
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask, StoredPrediction
from backend.detectors.yolo import YoloDetector
from backend.evaluation.metrics import detection_metrics
from worker.training.dataset import DatasetItem, DatasetResult

log = logging.getLogger(__name__)

# Every box counts for mAP: the gate ranks all of them (COCO's rule); precision / recall use the serving threshold.
ALL_BOXES = 0.001


def human_held_out(items: Sequence[DatasetItem]) -> list[DatasetItem]:
    """The held-out items, checked to be human-annotated: a model is never scored against drafts."""
    drafts = [i.task_id for i in items if i.source != "human"]
    if drafts:
        raise ValueError(f"draft tasks {drafts[:10]} are in the held-out split: the gate scores human labels only")
    return list(items)


def predict_items(detector: YoloDetector, items: Sequence[DatasetItem], config: ProjectConfig,
                  conf: float = ALL_BOXES) -> list[Detections]:
    """The detector's boxes on each dataset item's saved image, one image at a time (in saved pixels)."""
    out: list[Detections] = []
    for item in items:
        with Image.open(item.image_path) as image:
            out.append(detector.detect_batch([image.convert("RGB")], config, conf)[0])
    return out


def held_out_metrics(
    checkpoint: Path | str,
    dataset: DatasetResult,
    config: ProjectConfig,
    device: str = "cpu",
    imgsz: int | None = None,
    score_threshold: float = 0.25,
    keep: list[Detections] | None = None,
) -> dict:
    """mAP50-95, mAP50, P/R (at ``score_threshold``) of a checkpoint on the dataset's val split.

    The checkpoint runs as it serves (its trained imgsz unless ``imgsz`` is given, ``MAX_DET`` boxes).
    ``keep`` receives the predictions (one per val item, saved pixels) for the review (worker.training.review).
    """
    started = time.monotonic()
    if not Path(checkpoint).exists():  # YOLO() would try to download a missing .pt (an export is a folder)
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    detector = YoloDetector(checkpoint, Path(checkpoint).stem, device=device, imgsz=imgsz or 0)
    items = human_held_out(dataset.val_items)
    preds = predict_items(detector, items, config)
    if keep is not None:
        keep.extend(preds)
    metrics = detection_metrics(zip(preds, (i.ground_truth(saved=True) for i in items)), config.class_names,
                                score_threshold=score_threshold, max_det=detector.max_det)
    out = metrics.to_dict()
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate: dict
    current: dict | None
    gain: float | None
    # The served model's held-out predictions after this decision (not serialized): the review reuses them.
    predictions: list[Detections] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "predictions"}


def gate(candidate: dict, current: dict | None, min_gain: float) -> GateDecision:
    """Promote when there is no current model or candidate mAP50-95 > current + ``min_gain``."""
    if current is None:
        return GateDecision(True, "no current model", candidate, None, None)
    gain = float(candidate["map50_95"]) - float(current["map50_95"])
    figures = f"mAP50-95 {candidate['map50_95']:.4f}", f"current {current['map50_95']:.4f} + {min_gain}"
    if gain > min_gain:
        return GateDecision(True, f"{figures[0]} > {figures[1]}", candidate, current, gain)
    return GateDecision(False, f"{figures[0]} does not beat {figures[1]}", candidate, current, gain)


def evaluate_gate(
    candidate: Path | str,
    current: Path | str | None,
    dataset: DatasetResult,
    config: ProjectConfig,
    min_gain: float,
    device: str = "cpu",
) -> GateDecision:
    cand_preds: list[Detections] = []
    cur_preds: list[Detections] = []
    cand = held_out_metrics(candidate, dataset, config, device=device, keep=cand_preds)
    cur = None
    if current is not None:
        try:
            cur = held_out_metrics(current, dataset, config, device=device, keep=cur_preds)
        except Exception as exc:  # an unloadable current model must not block a good candidate
            log.warning("could not evaluate the current model %s: %s", current, exc)
            cur = None
    decision = gate(cand, cur, min_gain)
    decision.predictions = cand_preds if decision.promote else cur_preds
    return decision


# --- drafts ------------------------------------------------------------------------------------

def _prediction_order(pred: StoredPrediction) -> tuple:
    return (pred.created_at or "", pred.id or 0)


def draft_detections(task: AnnotatedTask, config: ProjectConfig, size: tuple[int, int]) -> dict[str, Detections]:
    """The latest stored draft of each source for one task (source -> Detections, original pixels)."""
    out: dict[str, Detections] = {}
    for pred in sorted(task.predictions, key=_prediction_order, reverse=True):
        boxes = parse_regions(pred.result, config, size, source_of=pred.region_source, dedupe=False,
                              default_score=pred.score if pred.score is not None else 1.0)
        sources = set(boxes.sources) or {pred.source}
        for source in sources:
            if source in out:
                continue
            keep = [i for i, s in enumerate(boxes.sources) if s == source]
            out[source] = Detections(boxes.xyxy[keep], [boxes.labels[i] for i in keep], boxes.scores[keep],
                                     size, source, pred.model_version)
    return out


def draft_quality(tasks: Sequence[AnnotatedTask], items: Sequence[DatasetItem], config: ProjectConfig) -> dict[str, dict]:
    """Per source: precision / recall at IoU 0.5 and mAP50 of stored drafts vs the final labels.

    ``items`` are the held-out dataset items (their ground truth is the human annotation);
    ``n`` counts the tasks that had a draft of that source.
    """
    by_id = {t.id: t for t in tasks}
    pairs: dict[str, list[tuple[Detections, Detections]]] = defaultdict(list)
    for item in human_held_out(items):
        task = by_id.get(item.task_id)
        if task is None or not task.predictions:
            continue
        truth = item.ground_truth(saved=False)
        for source, drafts in draft_detections(task, config, (item.orig_width, item.orig_height)).items():
            pairs[source].append((drafts, truth))
    out: dict[str, dict] = {}
    for source, source_pairs in sorted(pairs.items()):
        m = detection_metrics(source_pairs, config.class_names)
        out[source] = {"precision": m.precision, "recall": m.recall, "map50": m.map50, "n": m.n_images,
                       "n_gt": m.n_gt, "n_pred": m.n_pred}
    return out
