"""Decides, per task, which detector drafts it: Gemini first, YOLO as the fallback (or the reverse).

``ROUTING=gemini``: Gemini when configured, YOLO for every task Gemini cannot serve (no key,
error after retries, timeout, blocked, budget spent, circuit open).
``ROUTING=yolo``: YOLO only. ``ROUTING=auto``: like ``gemini`` until the registry's current
YOLO version measured at least as good as Gemini's drafts on human-corrected tasks, then YOLO
first with Gemini as the fallback: the cheap local model takes over from the paid API.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from backend.detections import Detections
from backend.detectors.gemini import GeminiDetector, GeminiUnavailable
from backend.detectors.yolo import YoloDetector
from backend.images import ImageError, ImageLoader, LoadedImage
from backend.label_config import ProjectConfig
from backend.metrics import DETECT_SECONDS, FALLBACKS
from backend.quality import yolo_preferred
from backend.registry import VersionInfo
from backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class TaskOutcome:
    """What one task got: detections, or the reason it got none."""

    detections: Detections | None = None
    reason: str = ""
    fallback_reason: str = ""


class Router:
    """Runs the detectors for a batch of tasks and returns one outcome per task, in order."""

    def __init__(self, settings: Settings, loader: ImageLoader, gemini: GeminiDetector | None):
        self.settings = settings
        self.loader = loader
        self.gemini = gemini

    def order(self, yolo: YoloDetector | None, yolo_info: VersionInfo | None) -> list[str]:
        """Detector sources to try, best first."""
        mode = self.settings.routing
        if mode == "yolo":
            return ["yolo"]
        if mode == "auto" and yolo is not None and yolo_preferred(yolo_info):
            return ["yolo", "gemini"]
        return ["gemini", "yolo"]

    def run(self, urls: list[tuple[str, int | None]], config: ProjectConfig, yolo: YoloDetector | None,
            yolo_info: VersionInfo | None = None, query: str | None = None) -> list[TaskOutcome]:
        order = self.order(yolo, yolo_info)
        outcomes = [TaskOutcome() for _ in urls]
        images: list[LoadedImage | None] = [None] * len(urls)
        with ThreadPoolExecutor(max_workers=self.settings.gemini_concurrency, thread_name_prefix="task") as pool:
            first_gemini = order[0] == "gemini"
            futures = [pool.submit(self._load_and_maybe_gemini, url, task_id, config, query, first_gemini) for url, task_id in urls]
            for i, future in enumerate(futures):
                images[i], outcomes[i] = future.result()

            pending = [i for i, o in enumerate(outcomes) if o.detections is None and images[i] is not None]
            for source in (order[1:] if first_gemini else order):
                if not pending:
                    break
                if source == "yolo":
                    pending = self._run_yolo(yolo, config, images, outcomes, pending)
                else:
                    results = list(pool.map(lambda i: self._gemini(images[i], config, query), pending))
                    for i, (det, reason) in zip(pending, results):
                        outcomes[i].detections = det
                        outcomes[i].fallback_reason = outcomes[i].fallback_reason or reason
                    pending = [i for i in pending if outcomes[i].detections is None]
        for i in pending:
            outcomes[i].reason = outcomes[i].reason or "; ".join(
                r for r in (outcomes[i].fallback_reason, "no YOLO model" if yolo is None else "") if r
            ) or "no detector available"
        return outcomes

    def _load_and_maybe_gemini(self, url: str, task_id: int | None, config: ProjectConfig, query: str | None,
                               use_gemini: bool) -> tuple[LoadedImage | None, TaskOutcome]:
        try:
            image = self.loader.load(url, task_id)
        except ImageError as exc:
            return None, TaskOutcome(reason=f"image {exc.reason}: {exc.message}")
        except Exception as exc:  # a loader bug on odd input must fail this task only, not the batch
            log.exception("loading the image of task %s failed unexpectedly", task_id)
            return None, TaskOutcome(reason=f"image error: {type(exc).__name__}")
        outcome = TaskOutcome()
        if use_gemini:
            outcome.detections, outcome.fallback_reason = self._gemini(image, config, query)
        return image, outcome

    def _gemini(self, image: LoadedImage, config: ProjectConfig, query: str | None) -> tuple[Detections | None, str]:
        if self.gemini is None:
            FALLBACKS.labels("not_configured").inc()
            return None, "gemini not_configured"
        started = time.perf_counter()
        try:
            detections = self.gemini.detect(image.image, image.sha256, config, query)
        except GeminiUnavailable as exc:
            FALLBACKS.labels(exc.reason).inc()
            log.info("gemini did not serve a task: %s (%s)", exc.reason, exc.message)
            return None, f"gemini {exc.reason}"
        except Exception as exc:  # a bug or an unexpected SDK error must fail this task only
            FALLBACKS.labels("error").inc()
            log.exception("gemini failed unexpectedly")
            return None, f"gemini error: {type(exc).__name__}"
        DETECT_SECONDS.labels("gemini").observe(time.perf_counter() - started)
        return detections, ""

    def _run_yolo(self, yolo: YoloDetector | None, config: ProjectConfig, images: list[LoadedImage | None],
                  outcomes: list[TaskOutcome], pending: list[int]) -> list[int]:
        if yolo is None:
            return pending
        started = time.perf_counter()
        threshold = config.score_threshold(self.settings.yolo_score_threshold)
        try:
            batch = yolo.detect_batch([images[i].image for i in pending], config, threshold)
        except Exception as exc:
            log.exception("yolo failed on a batch of %d", len(pending))
            for i in pending:
                outcomes[i].fallback_reason = "; ".join(r for r in (outcomes[i].fallback_reason, f"yolo error: {type(exc).__name__}") if r)
            return pending
        elapsed = time.perf_counter() - started
        for i, det in zip(pending, batch):
            outcomes[i].detections = det
            DETECT_SECONDS.labels("yolo").observe(elapsed / len(pending))
        return []
