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
from backend.serving.budget import LatencyModel, Plan, plan
from backend.serving.hotswap import ModelHolder
from backend.serving.routing import Router, TaskOutcome
from backend.serving.usefulness import usefulness

log = logging.getLogger(__name__)

#: Seconds per task YOLO is assumed to take until this process measured it (pessimistic for CPU).
YOLO_PRIOR_S = 0.25


def _task_id(task) -> int | None:
    return task.get("id") if isinstance(task, dict) else None


def task_image(task, image_key: str) -> tuple[str, str]:
    """The task's image URL, or "" and why the task cannot be drafted (reason codes: metrics.TASK_REASONS)."""
    if not isinstance(task, dict):
        return "", f"task not_an_object: a task is a {type(task).__name__}"
    data = task.get("data")
    if data is None:
        return "", "task no_data: the task has no 'data' object"
    if not isinstance(data, dict):
        return "", f"task data_not_an_object: 'data' is a {type(data).__name__}"
    value = data.get(image_key)
    if value is not None and not isinstance(value, str):
        return "", f"task image_not_a_string: the image value is a {type(value).__name__}"
    if not value or not value.strip():
        return "", f"task data has no '{image_key}' image URL"
    return value, ""


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
        self.latency = LatencyModel(settings.gemini_task_deadline, YOLO_PRIOR_S)
        self.router = Router(settings, loader, gemini, self.latency)

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

    def _yolo_for(self, key: str, config: ProjectConfig | None):
        path = self._model_path(config)
        yolo = self.models.for_path(path) if path else self.models.get(key)
        yolo_info = self.registry.get(key, yolo.version) if yolo is not None and not path else None
        return yolo, yolo_info

    def plan(self, n: int, config: ProjectConfig, project: str | int) -> Plan:
        """Answer ``n`` tasks inline, or draft them in the background (see backend.serving.budget)."""
        yolo, yolo_info = self._yolo_for(project_key(project), config)
        order = [s for s in self.router.order(yolo, yolo_info)
                 if (s == "gemini" and self.gemini is not None) or (s == "yolo" and yolo is not None)]
        if not order:  # nothing to run: every task gets an empty prediction at once
            return Plan(True, 0.0, self.settings.predict_timeout * self.settings.predict_inline_share)
        return plan(n, order, self.latency, self.settings.gemini_concurrency, self.settings.predict_timeout,
                    self.settings.predict_inline_share)

    def predict(self, tasks: list, config: ProjectConfig, project: str | int, query: str | None = None,
                query_label: str | None = None, deadline: float | None = None) -> list[dict]:
        """One prediction dict ``{result, score, model_version}`` per task, same order.

        ``query`` is an annotator's free-text request (interactive mode); its boxes are labelled
        ``query_label``. Past ``deadline`` (``time.monotonic()``) it raises :class:`Abandoned`.
        """
        return [prediction for prediction, _ in self.predict_detailed(tasks, config, project, query, query_label, deadline)]

    def predict_detailed(self, tasks: list, config: ProjectConfig, project: str | int,
                         query: str | None = None, query_label: str | None = None,
                         deadline: float | None = None) -> list[tuple[dict, str]]:
        """Like :meth:`predict`, with the reason a task got an empty prediction ("" when it was served).

        The pre-labeling job stores a real "nothing found" but not a failure, so it can retry those. A
        task the request got wrong (not an object, no ``data``, no image URL string) is not routed: its
        prediction is empty and carries ``reason`` (a code of a fixed set), and the others are served.
        """
        key = project_key(project)
        yolo, yolo_info = self._yolo_for(key, config)
        state = ServingState(key, yolo.version if yolo else None, self._gemini_model())
        checked = [task_image(task, config.image_key) for task in tasks]
        routed = [i for i, (_, problem) in enumerate(checked) if not problem]
        outcomes = dict(zip(routed, self.router.run([(checked[i][0], _task_id(tasks[i])) for i in routed], config, yolo,
                                                    yolo_info, query, deadline=deadline)))
        predictions = []
        for i, task in enumerate(tasks):
            problem = checked[i][1]
            outcome = outcomes.get(i) or TaskOutcome(reason=problem)
            if outcome.detections is not None and query_label:
                outcome.detections = replace(outcome.detections, labels=[query_label] * len(outcome.detections))
            prediction = self._prediction(_task_id(task), config, outcome.detections, outcome.reason, state)
            if problem:
                prediction["reason"] = failure_reason(problem)  # Label Studio keeps only result/score/model_version
            predictions.append((prediction, "" if outcome.detections is not None else outcome.reason))
        return predictions

    def draft(self, task_id, config: ProjectConfig, project: str | int, detections: Detections) -> dict:
        """The prediction ``{result, score, model_version}`` of detections found elsewhere (a Gemini batch)."""
        return self._prediction(task_id, config, detections, "", self.state(project, config))

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
        if self.gemini is not None:  # lifetime drafts per source (and per project), for the cost per 1,000 drafted tasks
            tier = detections.meta.get("tier") if detections.source == "gemini" else None
            self.gemini.cost.count_task(f"gemini:{tier or 'standard'}" if detections.source == "gemini" else detections.source,
                                        state.project, float(detections.meta.get("cost_usd") or 0.0))
        log.info("task %s: %d regions from %s (%s)", task_id, len(regions), detections.source, detections.model)
        return {"result": regions, "score": self._score(config, detections, regions), "model_version": state.model_version}

    def _score(self, config: ProjectConfig, detections: Detections, regions: list[dict]) -> float:
        """``PREDICTION_SCORE``: the mean region confidence, or the task's usefulness (backend.serving.usefulness).

        Usefulness needs YOLO's view: a YOLO draft is scored from the boxes routing returned, those at or
        above the served threshold (an approximation: the re-score job also sees the boxes down to
        ``usefulness.FLOOR``); a draft YOLO never saw (Gemini's) scores 1.0, at the top, until the re-score
        job runs YOLO on it (after each promotion, or ``lsb rank``).
        """
        if self.settings.prediction_score == "confidence":
            return sum(r["score"] for r in regions) / len(regions) if regions else 0.0
        if detections.source != "yolo":
            return 1.0
        return usefulness(detections, config.score_threshold(self.settings.yolo_score_threshold))
