"""The Label Studio model: ``setup``, ``predict`` and ``model_version`` as in label-studio-ml v2.

Turns a batch of Label Studio tasks into exactly one prediction per task, in order: routing picks
the detector, the control models write the regions. Used by the HTTP routes and by the
background pre-labeling job alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from backend.control_models import CONTROL_MODELS
from backend.core.detections import Detections
from backend.core.images import ImageLoader
from backend.core.keys import project_key
from backend.core.label_config import ProjectConfig
from backend.core.metrics import PREDICTION_FAILURES, PREDICTIONS, failure_reason
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector
from backend.serving.hotswap import ModelHolder
from backend.serving.routing import Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingState:
    """What one request is served with: a snapshot, so a hot-swap mid-request changes nothing."""

    project: str
    yolo_version: str | None
    gemini_model: str | None

    @property
    def model_version(self) -> str:
        """The version string Label Studio stores; it changes when the served models change."""
        parts = []
        if self.gemini_model:
            parts.append(f"gemini:{self.gemini_model}")
        if self.yolo_version:
            parts.append(f"yolo:{self.yolo_version}")
        return "+".join(parts) or "no-model"


class Predictor:
    """One per process; thread-safe."""

    def __init__(self, settings: Settings, registry: ModelRegistry, models: ModelHolder, loader: ImageLoader,
                 gemini: GeminiDetector | None):
        self.settings = settings
        self.registry = registry
        self.models = models
        self.gemini = gemini
        self.router = Router(settings, loader, gemini)

    def close(self) -> None:
        """Release the HTTP clients (image loader, Gemini) of a short-lived predictor, such as a job's."""
        self.router.loader.close()
        if self.gemini is not None:
            self.gemini.close()

    def _gemini_model(self) -> str | None:
        return self.gemini.model if self.gemini is not None and self.settings.routing != "yolo" else None

    @staticmethod
    def _model_path(config: ProjectConfig | None) -> str:
        """The official YOLO backend's ``model_path`` attribute on a control, if any."""
        return next((c.model_path for c in config.controls if c.model_path), "") if config else ""

    def state(self, project: str | int, config: ProjectConfig | None = None) -> ServingState:
        """The serving state without loading anything (for /setup)."""
        key = project_key(project)
        path = self._model_path(config)
        yolo_version = self.models.path_version(self.models.resolve_model_path(path)) if path else self.models.version(key)
        return ServingState(key, yolo_version, self._gemini_model())

    def model_version(self, project: str | int, config: ProjectConfig | None = None) -> str:
        return self.state(project, config).model_version

    def predict(self, tasks: list[dict], config: ProjectConfig, project: str | int, query: str | None = None,
                query_label: str | None = None) -> list[dict]:
        """One prediction dict ``{result, score, model_version}`` per task, same order.

        ``query`` is an annotator's free-text request (interactive mode); its boxes are labelled
        ``query_label``.
        """
        return [prediction for prediction, _ in self.predict_detailed(tasks, config, project, query, query_label)]

    def predict_detailed(self, tasks: list[dict], config: ProjectConfig, project: str | int,
                         query: str | None = None, query_label: str | None = None) -> list[tuple[dict, str]]:
        """Like :meth:`predict`, with the reason a task got an empty prediction ("" when it was served).

        The pre-labeling job stores a real "nothing found" but not a failure, so it can retry those.
        """
        key = project_key(project)
        path = self._model_path(config)
        yolo = self.models.for_path(path) if path else self.models.get(key)
        yolo_info = self.registry.get(key, yolo.version) if yolo is not None and not path else None
        state = ServingState(key, yolo.version if yolo else None, self._gemini_model())
        urls = []
        for task in tasks:
            value = (task.get("data") or {}).get(config.image_key)
            urls.append((value if isinstance(value, str) else "", task.get("id")))
        outcomes = self.router.run(urls, config, yolo, yolo_info, query)
        predictions = []
        for task, (url, _), outcome in zip(tasks, urls, outcomes):
            if not url:
                outcome.detections, outcome.reason = None, f"task data has no '{config.image_key}' image URL"
            if outcome.detections is not None and query_label:
                outcome.detections = replace(outcome.detections, labels=[query_label] * len(outcome.detections))
            prediction = self._prediction(task.get("id"), config, outcome.detections, outcome.reason, state)
            predictions.append((prediction, "" if outcome.detections is not None else outcome.reason))
        return predictions

    def _threshold(self, control, detections: Detections) -> float:
        """Score thresholds (``model_score_threshold``) apply to YOLO's calibrated scores only.

        Gemini gives no calibrated confidence, so its boxes are never cut by a YOLO threshold.
        """
        if detections.source != "yolo":
            return 0.0
        return control.score_threshold if control.score_threshold is not None else self.settings.yolo_score_threshold

    def _prediction(self, task_id, config: ProjectConfig, detections: Detections | None, reason: str,
                    state: ServingState) -> dict:
        if detections is None:
            PREDICTION_FAILURES.labels(failure_reason(reason)).inc()
            log.warning("task %s: empty prediction (%s)", task_id, reason)
            return {"result": [], "score": 0.0, "model_version": state.model_version}
        regions: list[dict] = []
        for control in config.controls:
            regions.extend(CONTROL_MODELS[control.tag](control, self._threshold(control, detections)).regions(detections))
        PREDICTIONS.labels(detections.source).inc()
        log.info("task %s: %d regions from %s (%s)", task_id, len(regions), detections.source, detections.model)
        score = sum(r["score"] for r in regions) / len(regions) if regions else 0.0
        return {"result": regions, "score": score, "model_version": state.model_version}
