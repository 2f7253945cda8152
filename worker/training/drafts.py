"""Pseudo-labels: the stored drafts of tasks nobody has annotated, as extra training data (``TRAIN_DRAFTS``).

Most tasks of a project are never annotated, yet after pre-labeling each holds a draft the project
paid for. A training may learn from them too (as autodistill does), under these rules:

- A task with a human annotation never uses its drafts (human labels win): Label Studio lists
  unannotated tasks only (:func:`backend.core.label_studio.fetch_drafted_tasks`), and
  :func:`worker.training.dataset.build_dataset` drops the draft of any task it also has an annotation for.
- One prediction per task: the latest of the model version ``/setup`` reports now (what annotators
  are shown), else the latest of any version.
- Regions scored below ``TRAIN_DRAFT_MIN_SCORE`` are dropped (the region's ``score``, else its
  prediction's; a region with neither is kept). A draft left without a region is not used: it would
  teach "nothing here" where the detector was only unsure.
- Drafts join the training split only, never the held-out one: the promotion gate and the
  draft-quality figures score human labels. They make at most ``TRAIN_DRAFT_MAX_SHARE`` of the
  training images: with ``h`` human-annotated training tasks, at most
  ``floor(share / (1 - share) * h)`` drafts (0.5: ``h``), taken in split-hash order (stable as the
  project grows); a draft whose image fails to load gives its place to the next one.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from backend.control_models.reader import region_score
from backend.core.label_studio import AnnotatedTask, DraftedTask, StoredPrediction
from worker.training.staging import StagedImage, StagingPlan, stage_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftLabels:
    """One unannotated task as a training example: ``task.result`` holds the kept regions of ``prediction``."""

    task: AnnotatedTask
    prediction: StoredPrediction
    dropped_regions: int = 0

    @property
    def fingerprint(self) -> str:
        """What identifies this draft's labels for the dataset hash."""
        return f"draft:{self.task.id}:{self.prediction.id}:{self.prediction.created_at}:{len(self.task.result)}"


@dataclass
class DraftSelection:
    """The drafts a training may use, and why the others were left out (before any image is loaded)."""

    drafts: list[DraftLabels]
    listed: int  # unannotated tasks with stored predictions
    preferred_version: str | None
    min_score: float
    skipped: Counter = field(default_factory=Counter)
    low_score_regions: int = 0

    def fingerprints(self) -> list[str]:
        return sorted(d.fingerprint for d in self.drafts)


def _newest_first(pred: StoredPrediction) -> tuple:
    return (pred.created_at or "", pred.id or 0)


def latest_prediction(predictions: Sequence[StoredPrediction], preferred_version: str | None) -> StoredPrediction | None:
    """The latest prediction of ``preferred_version`` if the task holds one, else the latest of any version."""
    preferred = [p for p in predictions if preferred_version and p.model_version == preferred_version]
    candidates = preferred or list(predictions)
    return max(candidates, key=_newest_first) if candidates else None


def draft_labels(task: DraftedTask, preferred_version: str | None, min_score: float) -> DraftLabels | None:
    """The task's chosen draft with its regions below ``min_score`` dropped; None when it has no prediction."""
    prediction = latest_prediction(task.predictions, preferred_version)
    if prediction is None:
        return None
    kept = [r for r in prediction.result
            if not isinstance(r, dict) or (score := region_score(r, prediction.score)) is None or score >= min_score]
    labels = AnnotatedTask(id=task.id, data=task.data, annotation_id=None, annotation_updated_at="", result=kept,
                           predictions=(prediction,))
    return DraftLabels(labels, prediction, len(prediction.result) - len(kept))


def select_drafts(tasks: Sequence[DraftedTask], preferred_version: str | None, min_score: float) -> DraftSelection:
    """Every listed task's draft that keeps at least one region at or above ``min_score``."""
    selection = DraftSelection([], len(tasks), preferred_version, min_score)
    for task in tasks:
        draft = draft_labels(task, preferred_version, min_score)
        if draft is None:
            selection.skipped["no_prediction"] += 1
            continue
        selection.low_score_regions += draft.dropped_regions
        if not draft.task.result:
            selection.skipped["no_region_above_min_score"] += 1
            continue
        selection.drafts.append(draft)
    log.info("drafts: %d of %d unannotated tasks usable (version %s preferred, %d regions below %.2f dropped, skipped %s)",
             len(selection.drafts), len(tasks), preferred_version, selection.low_score_regions, min_score,
             dict(selection.skipped))
    return selection


def draft_cap(human_train: int, max_share: float) -> int:
    """How many drafts keep them at most ``max_share`` of the training images beside ``human_train`` human ones."""
    if max_share <= 0 or human_train <= 0:
        return 0
    return math.floor(max_share / (1.0 - max_share) * human_train + 1e-9)


def stage_drafts(ranked: Sequence[DraftLabels], cap: int, plan: StagingPlan) -> tuple[list[StagedImage], list[StagedImage]]:
    """Stage drafts in ``ranked`` order until ``cap`` are written: (written, skipped).

    Only as many as still missing are loaded at a time, so no image beyond the cap is downloaded unless
    one before it failed; the written ones are the first ``cap`` usable drafts of the ranking.
    """
    written: list[StagedImage] = []
    skipped: list[StagedImage] = []
    position = 0
    while len(written) < cap and position < len(ranked):
        chunk = ranked[position:position + cap - len(written)]
        position += len(chunk)
        for record in stage_images([d.task for d in chunk], plan, needs_boxes=True):
            (written if record.ok else skipped).append(record)
    return written, skipped
