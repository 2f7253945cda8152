"""Local open-vocabulary drafting: OWL-ViT / OWLv2 boxes from the label config's words, SAM masks.

``OwlVitDetector.detect(image, sha256, config, query=None) -> Detections`` has the shape of
:meth:`backend.detectors.gemini.client.GeminiDetector.detect`, so routing, the CLI and evaluation can use
either. Text queries come from the label config: every ``<Label>``'s value, ``hint`` and
``predicted_values``, each put in OWL-ViT's training template ("a photo of a {}"); every query
maps back to its label (:func:`build_queries`). An interactive ``query`` replaces them all (used as typed) and
is labelled like Gemini labels it (:func:`backend.detectors.gemini.client.best_label`).

Pipeline after the model (each step optional, in this order; supervision does the box work):

1. confidence filter: the best query's sigmoid score >= ``threshold`` (``OWLVIT_THRESHOLD``);
2. high-IoU box merging (``merge_iou``): near-identical boxes of one label, e.g. found by two
   queries of the same label, become one (``sv.Detections.with_nmm``);
3. NMS per label (``nms_iou``, ``with_nms``), or Gaussian Soft-NMS (``soft_nms_sigma``,
   ``with_soft_nms``: overlapping boxes lose score instead of being dropped, then the threshold is
   applied again), plus optional class-agnostic NMS across labels (``agnostic_nms_iou``);
4. the ``max_objects`` best;
5. masks, only when the config wants masks (BrushLabels / PolygonLabels): SAM with each box as the
   prompt, best of its three candidates (:mod:`backend.detectors.sam`); a mask-area filter
   (``min_mask_area``, fraction of the image) drops boxes whose mask is smaller; an empty mask, or
   no SAM configured, falls back to the filled box (``geometry.box_to_mask``), like Gemini's parser.

Weights: ``OWLVIT_MODEL`` (default ``google/owlv2-base-patch16-ensemble``) and ``SAM_MODEL``
(default empty = no SAM) are local folders or hub ids already in the local Hugging Face cache;
nothing is downloaded at run time. Box coordinates come out of the model as normalised
``cx, cy, w, h`` (YOLO's format) of the model's input frame: OWLv2 pads the image to a square at
the bottom/right, so its frame is ``max(w, h)`` on both sides; OWL-ViT stretches, so its frame is
the image itself. The conversion is :func:`backend.core.geometry.yolo_to_xyxy`.

Settings: ``OWLVIT_MODEL``, ``OWLVIT_THRESHOLD``, ``SAM_MODEL``, ``OWLVIT_DEVICE`` (:mod:`backend.core.settings`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from backend.core import geometry
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings
from backend.detectors.gemini.client import best_label
from backend.detectors.sam import BoxSegmenter, ModelNotAvailable, resolve_pretrained, set_torch_threads

log = logging.getLogger(__name__)

DEFAULT_MODEL = "google/owlv2-base-patch16-ensemble"
DEFAULT_THRESHOLD = 0.1
PROMPT_TEMPLATE = "a photo of a {}"
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)

__all__ = ["ModelNotAvailable", "OwlVitDetector", "OwlVitOptions", "build_queries"]


@dataclass(frozen=True)
class OwlVitOptions:
    """Everything that shapes the detector's answer (the module docstring explains each step)."""

    model: str = DEFAULT_MODEL
    sam_model: str = ""
    threshold: float = DEFAULT_THRESHOLD
    merge_iou: float | None = 0.9
    nms_iou: float | None = 0.5
    soft_nms_sigma: float | None = None
    agnostic_nms_iou: float | None = None
    max_objects: int = 100
    min_mask_area: float = 0.0
    template: str = PROMPT_TEMPLATE
    device: str = "cpu"
    threads: int = 0

    @classmethod
    def from_env(cls, **overrides) -> OwlVitOptions:
        settings = Settings()
        values = {
            "model": settings.owlvit_model.strip() or DEFAULT_MODEL,
            "sam_model": settings.sam_model.strip(),
            "threshold": settings.owlvit_threshold,
            "device": settings.owlvit_device.strip() or "cpu",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def build_queries(config: ProjectConfig, query: str | None = None, template: str = PROMPT_TEMPLATE) -> list[tuple[str, str]]:
    """``[(text query, label value)]``: every label's value, then hints, then predicted values.

    Values come first so a word that is one label's name and another label's predicted value
    (or hint) stays with the label it names; duplicates (case-insensitive) are dropped.
    """
    def fill(phrase: str) -> str:
        phrase = " ".join(phrase.replace("_", " ").split())
        return template.format(_ARTICLE.sub("", phrase)) if template else phrase

    if query and query.strip():  # the annotator's own words, as typed
        return [(" ".join(query.split()), best_label(config, query))]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    passes = (
        [(label.value, label) for label in config.labels],
        [(label.hint, label) for label in config.labels if label.hint],
        [(value, label) for label in config.labels for value in label.predicted_values],
    )
    for phrases in passes:
        for phrase, label in phrases:
            text = fill(phrase)
            if text and text.lower() not in seen:
                seen.add(text.lower())
                out.append((text, label.value))
    return out


class OwlVitDetector:
    """OWL-ViT / OWLv2 (+ optional SAM). One per process; thread-safe (model calls are serialised)."""

    source = "owlvit"

    def __init__(self, options: OwlVitOptions | None = None, **overrides):
        options = options or OwlVitOptions.from_env()
        self.options = replace(options, **overrides) if overrides else options
        path = resolve_pretrained(self.options.model, "OWLVIT_MODEL")
        import torch  # noqa: F401
        from transformers import (  # heavy: transformers, only when the model loads
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
        )
        from transformers.utils import logging as hf_logging  # heavy: with transformers above

        hf_logging.disable_progress_bar()
        started = time.perf_counter()
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = (AutoModelForZeroShotObjectDetection.from_pretrained(path, local_files_only=True)
                      .to(self.options.device).eval())
        # OWLv2 pads to a square (bottom/right) before resizing; OWL-ViT stretches the whole image.
        self.square_frame = (bool(getattr(self.processor.image_processor, "do_pad", False))
                             or self.model.config.model_type == "owlv2")
        self.segmenter = (BoxSegmenter(self.options.sam_model, self.options.device, self.options.threads)
                          if self.options.sam_model else None)
        set_torch_threads(self.options.threads)
        self._lock = threading.Lock()
        self.load_seconds = round(time.perf_counter() - started, 3)
        self.model_name = Path(self.options.model.rstrip("/")).name + (f"+{self.segmenter.model_name}" if self.segmenter else "")
        log.info("owlvit: loaded %s (%s)%s in %.1f s", self.options.model, self.model.config.model_type,
                 f" with SAM {self.options.sam_model}" if self.segmenter else "", self.load_seconds)

    @classmethod
    def from_env(cls, **overrides) -> OwlVitDetector:
        return cls(OwlVitOptions.from_env(**overrides))

    @property
    def model_version(self) -> str:
        return self.model_name

    # --- the detector --------------------------------------------------------------------------

    def detect(self, image: Image.Image, image_sha256: str = "", config: ProjectConfig | None = None,
               query: str | None = None) -> Detections:
        """Boxes (and masks when the config wants them) on ``image`` in its own pixels."""
        if config is None:
            raise ValueError("a ProjectConfig is needed: the text queries come from its labels")
        started = time.perf_counter()
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        queries = build_queries(config, query, self.options.template)
        class_names = list(dict.fromkeys([*config.class_names, *(label for _, label in queries)]))
        raw_scores, raw_boxes = self._forward(image, [text for text, _ in queries])
        best = raw_scores.argmax(axis=1) if raw_scores.size else np.zeros(0, dtype=int)
        scores = raw_scores.max(axis=1) if raw_scores.size else np.zeros(0)
        keep = scores >= self.options.threshold
        frame = (max(width, height),) * 2 if self.square_frame else (width, height)
        xyxy = np.array([geometry.yolo_to_xyxy(b, *frame) for b in raw_boxes[keep]], dtype=float).reshape(-1, 4)
        xyxy = np.clip(xyxy, 0, [width, height, width, height])
        class_id = np.array([class_names.index(queries[int(q)][1]) for q in best[keep]], dtype=int)
        scores = scores[keep]
        sized = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
        counts = {"queries": len(queries), "raw": len(raw_boxes), "above_threshold": int(keep.sum())}
        xyxy, scores, class_id, counts_post = self._postprocess(xyxy[sized], scores[sized], class_id[sized])
        counts.update(counts_post)
        labels = [class_names[int(c)] for c in class_id]

        masks = None
        meta: dict = {}
        if config.wants_masks:
            xyxy, scores, labels, masks, meta = self._masks(image, xyxy, scores, labels)
            counts["after_mask_filter"] = len(labels)
        meta.update(counts=counts, threshold=self.options.threshold, latency_s=round(time.perf_counter() - started, 3),
                    queries=[text for text, _ in queries])
        return Detections(xyxy, labels, scores, (width, height), self.source, self.model_name, masks, meta)

    def _forward(self, image: Image.Image, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, T) sigmoid, boxes (Q, 4) normalised cx cy w h)`` for one image."""
        import torch  # heavy: torch, imported only when a model is loaded

        with self._lock, torch.no_grad():
            inputs = self.processor(text=[texts], images=image, return_tensors="pt", truncation=True).to(self.options.device)
            outputs = self.model(**inputs)
            scores = torch.sigmoid(outputs.logits[0].float()).cpu().numpy()
            boxes = outputs.pred_boxes[0].float().cpu().numpy()
        return scores.reshape(len(boxes), len(texts)), boxes.reshape(-1, 4)

    def _postprocess(self, xyxy: np.ndarray, scores: np.ndarray, class_id: np.ndarray):
        import supervision as sv  # heavy: supervision costs ~0.8 s to import (scipy)

        o = self.options
        counts: dict[str, int] = {}
        if not len(scores):
            return xyxy.reshape(0, 4), scores, class_id, counts
        det = sv.Detections(xyxy=xyxy.astype(float), confidence=scores.astype(float), class_id=class_id.astype(int))
        if o.merge_iou:
            det = det.with_nmm(threshold=o.merge_iou, class_agnostic=False)
            counts["after_merge"] = len(det)
        if o.soft_nms_sigma:
            det = det.with_soft_nms(sigma=o.soft_nms_sigma, class_agnostic=False, score_threshold=o.threshold)
            counts["after_soft_nms"] = len(det)
        elif o.nms_iou:
            det = det.with_nms(threshold=o.nms_iou, class_agnostic=False)
            counts["after_nms"] = len(det)
        if o.agnostic_nms_iou and len(det):
            det = det.with_nms(threshold=o.agnostic_nms_iou, class_agnostic=True)
            counts["after_agnostic_nms"] = len(det)
        if len(det) > o.max_objects:
            det = det[np.argsort(-det.confidence, kind="stable")[: o.max_objects]]
        order = np.argsort(-det.confidence, kind="stable")  # best first, like the other detectors' output
        det = det[order]
        return (np.asarray(det.xyxy, dtype=float).reshape(-1, 4), np.asarray(det.confidence, dtype=float),
                np.asarray(det.class_id, dtype=int), counts)

    def _masks(self, image: Image.Image, xyxy: np.ndarray, scores: np.ndarray, labels: list[str]):
        width, height = image.size
        meta: dict = {"mask_model": self.segmenter.model_name if self.segmenter else "box"}
        if not len(labels):
            return xyxy, scores, labels, np.zeros((0, height, width), dtype=bool), meta
        if self.segmenter is None:
            masks = np.stack([geometry.box_to_mask(b, width, height) for b in xyxy])
            meta["mask_fallbacks"] = len(labels)
            return xyxy, scores, labels, masks, meta
        masks, mask_iou = self.segmenter.segment(image, xyxy)
        area = masks.reshape(len(masks), -1).sum(axis=1) / float(width * height)
        keep = area >= self.options.min_mask_area if self.options.min_mask_area > 0 else np.ones(len(labels), dtype=bool)
        meta["mask_area_dropped"] = int((~keep).sum())
        xyxy, scores, masks, mask_iou = xyxy[keep], scores[keep], masks[keep], mask_iou[keep]
        labels = [label for label, k in zip(labels, keep) if k]
        fallbacks = 0
        for i in range(len(masks)):
            if not masks[i].any():
                masks[i] = geometry.box_to_mask(xyxy[i], width, height)
                fallbacks += 1
        meta.update(mask_fallbacks=fallbacks, mask_predicted_iou=[round(float(v), 4) for v in mask_iou])
        return xyxy, scores, labels, masks, meta
