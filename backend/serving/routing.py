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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from backend.core.detections import Detections
from backend.core.images import ImageError, ImageLoader, LoadedImage
from backend.core.label_config import ProjectConfig
from backend.core.metrics import DETECT_SECONDS, FALLBACKS
from backend.core.registry import VersionInfo
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector, GeminiUnavailable
from backend.detectors.yolo import YoloDetector
from backend.serving.quality import yolo_preferred

log = logging.getLogger(__name__)

# Images of a request load on their own threads, ahead of the Gemini calls: a Gemini slot that
# frees up finds the next image decoded instead of downloading it first (BENCHMARKS.md section 1).
LOAD_THREADS = 8


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
        with ThreadPoolExecutor(max_workers=min(LOAD_THREADS, len(urls)) or 1, thread_name_prefix="load") as loaders, \
                ThreadPoolExecutor(max_workers=self.settings.gemini_concurrency, thread_name_prefix="gemini") as callers:
            loads = [loaders.submit(self._load, url, task_id) for url, task_id in urls]
            # Gemini first: each call starts the moment its image is loaded, while the others load.
            calls = self._start_gemini(callers, loads, range(len(urls)), config, query) if order[0] == "gemini" else {}
            images = self._gather_images(loads, outcomes)
            pending = [i for i, image in enumerate(images) if image is not None]
            for source in order:
                if not pending:
                    break
                if source == "yolo":
                    pending = self._run_yolo(yolo, config, images, outcomes, pending)
                else:
                    calls = calls or self._start_gemini(callers, loads, pending, config, query)
                    pending = self._collect_gemini(calls, outcomes, pending)
        for outcome in outcomes:
            if outcome.detections is None and not outcome.reason:
                outcome.reason = "; ".join(
                    r for r in (outcome.fallback_reason, "no YOLO model" if yolo is None else "") if r
                ) or "no detector available"
        return outcomes

    @staticmethod
    def _gather_images(loads: list[Future], outcomes: list[TaskOutcome]) -> list[LoadedImage | None]:
        """Every task's image (waiting for the loads), or None with the reason in its outcome."""
        images: list[LoadedImage | None] = []
        for i, load in enumerate(loads):
            image, reason = load.result()
            images.append(image)
            outcomes[i].reason = reason
        return images

    def _start_gemini(self, callers: ThreadPoolExecutor, loads: list[Future], indices, config: ProjectConfig,
                      query: str | None) -> dict[int, Future]:
        """A Gemini call per task, each waiting for its own image only."""
        def call(i: int) -> tuple[Detections | None, str]:
            image, _ = loads[i].result()
            return self._gemini(image, config, query) if image is not None else (None, "")

        return {i: callers.submit(call, i) for i in indices}

    @staticmethod
    def _collect_gemini(calls: dict[int, Future], outcomes: list[TaskOutcome], pending: list[int]) -> list[int]:
        """Gemini's answers into the outcomes; the tasks it could not serve stay pending."""
        for i in pending:
            det, reason = calls[i].result()
            outcomes[i].detections = det
            outcomes[i].fallback_reason = outcomes[i].fallback_reason or reason
        return [i for i in pending if outcomes[i].detections is None]

    def _load(self, url: str, task_id: int | None) -> tuple[LoadedImage | None, str]:
        try:
            return self.loader.load(url, task_id), ""
        except ImageError as exc:
            return None, f"image {exc.reason}: {exc.message}"
        except Exception as exc:  # a loader bug on odd input must fail this task only, not the batch
            log.exception("loading the image of task %s failed unexpectedly", task_id)
            return None, f"image error: {type(exc).__name__}"

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
                outcomes[i].fallback_reason = "; ".join(r for r in (outcomes[i].fallback_reason,
                                                                    f"yolo error: {type(exc).__name__}") if r)
            return pending
        elapsed = time.perf_counter() - started
        for i, det in zip(pending, batch):
            outcomes[i].detections = det
            DETECT_SECONDS.labels("yolo").observe(elapsed / len(pending))
        return []

