"""Decides, per task, which detector drafts it: Gemini first, YOLO as the fallback (or the reverse).

``ROUTING=gemini``: Gemini when configured, YOLO for every task Gemini cannot serve (no key,
error after retries, timeout, blocked, budget spent, circuit open).
``ROUTING=yolo``: YOLO only. ``ROUTING=auto``: like ``gemini`` until the registry's current
YOLO version measured at least as good as Gemini's drafts on human-corrected tasks, then YOLO
first with Gemini as the fallback: the cheap local model takes over from the paid API.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from backend.core.detections import Detections
from backend.core.images import ImageError, ImageLoader, LoadedImage
from backend.core.label_config import ProjectConfig
from backend.core.metrics import DETECT_SECONDS, FALLBACKS
from backend.core.registry import VersionInfo
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector, GeminiUnavailable
from backend.detectors.yolo import YoloDetector
from backend.serving.budget import LatencyModel, PixelBudget
from backend.serving.quality import yolo_preferred

log = logging.getLogger(__name__)

# Images of a request load on their own threads, ahead of the Gemini calls: a Gemini slot that
# frees up finds the next image decoded instead of downloading it first (BENCHMARKS.md section 1).
LOAD_THREADS = 8
#: Images drafted by YOLO in one call at most: the fallback runs as failures come in, not at the end.
YOLO_CHUNK = 8


@dataclass
class TaskOutcome:
    """What one task got: detections, or the reason it got none."""

    detections: Detections | None = None
    reason: str = ""
    fallback_reason: str = ""


class Router:
    """Runs the detectors for a batch of tasks and returns one outcome per task, in order."""

    def __init__(self, settings: Settings, loader: ImageLoader, gemini: GeminiDetector | None,
                 latency: LatencyModel | None = None):
        self.settings = settings
        self.loader = loader
        self.gemini = gemini
        self.latency = latency

    def order(self, yolo: YoloDetector | None, yolo_info: VersionInfo | None) -> list[str]:
        """Detector sources to try, best first."""
        mode = self.settings.routing
        if mode == "yolo":
            return ["yolo"]
        if mode == "auto" and yolo is not None and yolo_preferred(yolo_info):
            return ["yolo", "gemini"]
        return ["gemini", "yolo"]

    def run(self, urls: list[tuple[str, int | None]], config: ProjectConfig, yolo: YoloDetector | None,
            yolo_info: VersionInfo | None = None, query: str | None = None, deadline: float | None = None) -> list[TaskOutcome]:
        """One outcome per task, in order. ``deadline`` (``time.monotonic()``): past it, :class:`Abandoned`.

        Each decoded image is dropped as soon as its task is drafted, and the images held at once stay
        within ``PREDICT_MAX_PIXELS`` (:class:`~backend.serving.budget.PixelBudget`): a load waits for room.
        """
        order = self.order(yolo, yolo_info)
        run = _Run(self, urls, config, yolo, query, order, deadline)
        outcomes = run.execute()
        for outcome in outcomes:
            if outcome.detections is None and not outcome.reason:
                outcome.reason = "; ".join(
                    r for r in (outcome.fallback_reason, "no YOLO model" if yolo is None else "") if r
                ) or "no detector available"
        if self.latency is not None and order and urls:
            self.latency.observe_fallbacks(run.fallbacks / len(urls))
        return outcomes

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
        cached = False
        try:
            detections = self.gemini.detect(image.image, image.sha256, config, query)
            cached = bool(detections.meta.get("cached"))
        except GeminiUnavailable as exc:
            FALLBACKS.labels(exc.reason).inc()
            log.info("gemini did not serve a task: %s (%s)", exc.reason, exc.message)
            return None, f"gemini {exc.reason}"
        except Exception as exc:  # a bug or an unexpected SDK error must fail this task only
            FALLBACKS.labels("error").inc()
            log.exception("gemini failed unexpectedly")
            return None, f"gemini error: {type(exc).__name__}"
        finally:
            # Failures count too (a slow failing Gemini is what the estimate must see); a cache hit does not:
            # it made no call, and its milliseconds would tell the inline-or-background decision that
            # Gemini is fast, so a later batch of uncached tasks would be answered inline and time out.
            if self.latency is not None and not cached:
                self.latency.observe("gemini", time.perf_counter() - started)
        DETECT_SECONDS.labels("gemini").observe(time.perf_counter() - started)
        return detections, ""

    def _yolo(self, yolo: YoloDetector, config: ProjectConfig, images: list[LoadedImage]) -> tuple[list[Detections] | None, str]:
        """YOLO on a chunk of images: their detections, or None and the reason for all of them."""
        started = time.perf_counter()
        threshold = config.score_threshold(self.settings.yolo_score_threshold)
        try:
            batch = yolo.detect_batch([image.image for image in images], config, threshold)
        except Exception as exc:
            log.exception("yolo failed on a batch of %d", len(images))
            return None, f"yolo error: {type(exc).__name__}"
        per_task = (time.perf_counter() - started) / len(images)
        for _ in images:
            DETECT_SECONDS.labels("yolo").observe(per_task)
        if self.latency is not None:
            self.latency.observe("yolo", per_task)
        return batch, ""


class Abandoned(Exception):
    """The request's deadline passed before every task was drafted (nothing is answered for any)."""


def _pixels(image: LoadedImage) -> int:
    return max(1, image.width * image.height)


class _Run:
    """One batch through the detectors, as results arrive (not in task order), so that no image waits
    for an earlier task: an image held for the fallback is drafted before the run blocks again, which
    keeps the pixel budget moving (a load waiting for room is never waiting on a held image)."""

    def __init__(self, router: Router, urls: list[tuple[str, int | None]], config: ProjectConfig,
                 yolo: YoloDetector | None, query: str | None, order: list[str], deadline: float | None):
        self.router, self.urls, self.config, self.yolo, self.query = router, urls, config, yolo, query
        self.order, self.deadline = order, deadline
        self.outcomes = [TaskOutcome() for _ in urls]
        self.budget = PixelBudget(router.settings.predict_max_pixels)
        self.reserve = max(1, router.settings.image_max_pixels)
        self.fallbacks = 0
        self._lock = threading.Lock()
        self._images: dict[int, LoadedImage] = {}  # task index -> its decoded image, while it is needed

    # --- images ------------------------------------------------------------------------------------
    def _load(self, i: int) -> bool:
        """Load task ``i``'s image into ``_images`` within the budget; False (reason set) when there is none."""
        if not self.budget.acquire(self.reserve, ticket=i):
            self.outcomes[i].reason = "abandoned"
            return False
        url, task_id = self.urls[i]
        image, reason = self.router._load(url, task_id)
        if image is None:
            self.budget.release(self.reserve)
            self.outcomes[i].reason = reason
            return False
        self.budget.release(self.reserve - min(self.reserve, _pixels(image)))  # keep only what it really holds
        with self._lock:
            self._images[i] = image
        return True

    def _take(self, i: int) -> LoadedImage | None:
        with self._lock:
            return self._images.get(i)

    def _drop(self, i: int) -> None:
        """Task ``i`` is drafted (or failed for good): its image and its share of the budget go."""
        with self._lock:
            image = self._images.pop(i, None)
        if image is not None:
            self.budget.release(min(self.reserve, _pixels(image)))

    # --- detectors ---------------------------------------------------------------------------------
    def _gemini_task(self, i: int, load: Future | None) -> tuple[int, Detections | None, str]:
        if load is not None and not load.result():
            return i, None, ""
        image = self._take(i)
        det, reason = self.router._gemini(image, self.config, self.query) if image is not None else (None, "")
        del image
        return i, det, reason

    def _run_yolo(self, indices: list[int]) -> list[int]:
        """YOLO on ``indices`` (their images held); returns the ones it could not serve (images kept)."""
        if not indices:
            return []
        if self.yolo is None:
            return indices
        images = [self._take(i) for i in indices]
        batch, reason = self.router._yolo(self.yolo, self.config, images)
        del images
        if batch is None:
            for i in indices:
                self.outcomes[i].fallback_reason = "; ".join(r for r in (self.outcomes[i].fallback_reason, reason) if r)
            return indices
        for i, det in zip(indices, batch):
            self.outcomes[i].detections = det
        return []

    def _remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Abandoned()
        return left

    # --- the run -----------------------------------------------------------------------------------
    def execute(self) -> list[TaskOutcome]:
        n = len(self.urls)
        if not n:
            return self.outcomes
        loaders = ThreadPoolExecutor(max_workers=min(LOAD_THREADS, n), thread_name_prefix="load")
        callers = ThreadPoolExecutor(max_workers=self.router.settings.gemini_concurrency, thread_name_prefix="gemini")
        abandoned = False
        try:
            loads = [loaders.submit(self._load, i) for i in range(n)]
            if not self.order:
                for i, load in enumerate(loads):
                    load.result()
                    self._drop(i)
            elif self.order[0] == "gemini":
                self._gemini_first(loads, callers)
            else:
                self._yolo_first(loads, callers)
            return self.outcomes
        except Abandoned:
            abandoned = True
            raise
        finally:
            self.budget.close()  # wakes loads still waiting for room (abandoned runs)
            loaders.shutdown(wait=not abandoned, cancel_futures=abandoned)
            callers.shutdown(wait=not abandoned, cancel_futures=abandoned)
            with self._lock:
                self._images.clear()

    def _wait(self, futures: set[Future]) -> set[Future]:
        done, _ = wait(futures, timeout=self._remaining(), return_when=FIRST_COMPLETED)
        if not done:
            raise Abandoned()
        return done

    def _gemini_first(self, loads: list[Future], callers: ThreadPoolExecutor) -> None:
        """Each Gemini call starts the moment its image is in; failures go to YOLO in chunks as they come."""
        pending = {callers.submit(self._gemini_task, i, loads[i]) for i in range(len(loads))}
        del loads
        waiting: list[int] = []  # images Gemini could not serve, held for YOLO
        while pending:
            done = self._wait(pending)
            pending -= done
            for future in done:
                i, det, reason = future.result()
                if det is not None:
                    self.outcomes[i].detections = det
                    self._drop(i)
                elif self._take(i) is not None:
                    self.outcomes[i].fallback_reason = self.outcomes[i].fallback_reason or reason
                    self.fallbacks += 1
                    waiting.append(i)
            # before blocking again: draft what waits for YOLO, so its images free the budget
            if waiting and (len(waiting) >= YOLO_CHUNK or not any(f.done() for f in pending)):
                self._run_yolo(waiting)
                for i in waiting:
                    self._drop(i)
                waiting = []
        self._run_yolo(waiting)
        for i in waiting:
            self._drop(i)

    def _yolo_first(self, loads: list[Future], callers: ThreadPoolExecutor) -> None:
        """YOLO in chunks as images come in; Gemini (when it is the fallback) for what YOLO could not serve."""
        index = {load: i for i, load in enumerate(loads)}
        pending = set(loads)
        del loads
        chunk: list[int] = []
        fallback = len(self.order) > 1
        while pending or chunk:
            if pending:
                done = self._wait(pending)
                pending -= done
                chunk.extend(index.pop(f) for f in done if f.result())
            if chunk and (len(chunk) >= YOLO_CHUNK or not pending or not any(f.done() for f in pending)):
                failed = self._run_yolo(chunk)
                for i in chunk:
                    if i not in failed:
                        self._drop(i)
                if failed:
                    self.fallbacks += len(failed)
                if failed and fallback:
                    calls = {callers.submit(self._gemini_task, i, None) for i in failed}
                    while calls:  # wait here: these images hold the budget until Gemini is done with them
                        done = self._wait(calls)
                        calls -= done
                        for future in done:
                            i, det, reason = future.result()
                            self.outcomes[i].detections = det
                            self.outcomes[i].fallback_reason = "; ".join(
                                r for r in (self.outcomes[i].fallback_reason, reason) if r)
                            self._drop(i)
                else:
                    for i in failed:
                        self._drop(i)
                chunk = []
