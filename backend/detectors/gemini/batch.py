"""Gemini's Batch API for bulk drafting: half price, answers within 24 h (docs/gemini.md#batch-api-and-flex).

Each task becomes one inlined request built exactly like the synchronous call (request.py: same prompt,
image encoding and generation config, no HTTP options), tagged with our own ``metadata.key`` (the task
id): results are matched by that key, never by order. A submitted batch is charged against the daily
budget at once (an estimate, :meth:`CostTracker.reserve`) and settled on its results (their billed
``usageMetadata`` at the batch price). Per-request failures come back as :class:`GeminiUnavailable`
with the same reason codes as the synchronous path, so the caller retries them there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from google.genai import types
from PIL import Image

from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.metrics import GEMINI_BATCHES
from backend.detectors.gemini.cache import CachedAnswer
from backend.detectors.gemini.client import GeminiDetector
from backend.detectors.gemini.cost import Usage
from backend.detectors.gemini.errors import GeminiUnavailable, reason_of_status
from backend.detectors.gemini.request import contents, encode_image, generation_config

log = logging.getLogger(__name__)

#: The SDK's JobState names (it maps the API's BATCH_STATE_* to these) and what they mean for us.
RUNNING = {"JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_QUEUED", "JOB_STATE_UNSPECIFIED"}
ENDED_WITHOUT_RESULTS = {"JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLED": "cancelled", "JOB_STATE_EXPIRED": "expired"}
#: Reservation per task when a batch is submitted: an image of up to 1024 px is at most 4 tiles of 258 tokens,
#: plus the prompt; a detection answer is a few hundred tokens. Settled to the billed usage on the results.
EST_PROMPT_TOKENS = 1400
EST_OUTPUT_TOKENS = 600


@dataclass(frozen=True)
class BatchResult:
    """One task's answer from a finished batch: ``answer`` or ``error`` (a per-request failure)."""

    key: str
    answer: CachedAnswer | None
    error: GeminiUnavailable | None
    cost_usd: float = 0.0


@dataclass(frozen=True)
class BatchPoll:
    state: str  # the SDK's JobState name
    results: list[BatchResult] | None  # only once JOB_STATE_SUCCEEDED

    @property
    def running(self) -> bool:
        return self.state in RUNNING


class GeminiBatches:
    """Submit, poll and read Gemini batches through the detector's client, prompt and cost tracker."""

    def __init__(self, detector: GeminiDetector) -> None:
        self.detector = detector

    def request(self, key: str, image: Image.Image, image_sha256: str, config: ProjectConfig) -> types.InlinedRequest:
        """The inlined request of one task (``key``: our own id, sent back in the result's metadata)."""
        d = self.detector
        prepared = d.prepare(config, None, image_sha256)
        return types.InlinedRequest(
            contents=contents(encode_image(image, d.settings.gemini_max_image_side), prepared.prompt),
            config=generation_config(d.settings, d.model, prepared.system),
            metadata={"key": str(key)},
        )

    def estimate_usd(self, n: int) -> float:
        return self.detector.cost.cost_usd(Usage(EST_PROMPT_TOKENS, EST_OUTPUT_TOKENS), "batch") * n

    def submit(self, requests: list[types.InlinedRequest], display_name: str) -> tuple[str, float]:
        """Create the batch; returns its name ("batches/<id>") and the USD reserved against today's budget.

        Raises :class:`GeminiUnavailable` ("budget", "circuit_open", or the API's refusal)."""
        d = self.detector
        d.check_allowed()
        try:
            job = d.client.batches.create(model=d.model, src=requests, config={"display_name": display_name[:120]})
        except GeminiUnavailable:
            raise
        except Exception as exc:
            raise d._unavailable(exc, clamped=False) from None
        reserved = d.cost.reserve(self.estimate_usd(len(requests)))
        GEMINI_BATCHES.labels(outcome="submitted").inc()
        log.info("gemini batch %s submitted: %d requests, $%.4f reserved", job.name, len(requests), reserved)
        return str(job.name), reserved

    def poll(self, name: str) -> BatchPoll:
        """The batch's state, and its results once it succeeded (each read once: the caller keeps them)."""
        d = self.detector
        try:
            job = d.client.batches.get(name=name)
        except Exception as exc:
            raise d._unavailable(exc, clamped=False) from None
        state = str(getattr(job.state, "name", job.state) or "JOB_STATE_UNSPECIFIED")
        if state != "JOB_STATE_SUCCEEDED":
            if state in ENDED_WITHOUT_RESULTS:
                GEMINI_BATCHES.labels(outcome=ENDED_WITHOUT_RESULTS[state]).inc()
            return BatchPoll(state, None)
        GEMINI_BATCHES.labels(outcome="succeeded").inc()
        results = []
        for item in (job.dest.inlined_responses if job.dest and job.dest.inlined_responses else []):
            key = str((item.metadata or {}).get("key", ""))
            if item.error is not None:
                err = item.error if isinstance(item.error, dict) else getattr(item.error, "__dict__", {})
                code = err.get("code")
                failure = GeminiUnavailable(reason_of_status(code), str(err.get("message", ""))[:300])
                results.append(BatchResult(key, None, failure))
                continue
            try:
                answer = d.read_response(item.response, "batch", charge=False)
                results.append(BatchResult(key, answer, None, d.cost.cost_usd(answer.usage, "batch")))
            except GeminiUnavailable as exc:  # blocked or empty: billed all the same
                usage = Usage.from_metadata(getattr(item.response, "usage_metadata", None))
                results.append(BatchResult(key, None, exc, d.cost.cost_usd(usage, "batch")))
        return BatchPoll(state, results)

    def detections(self, answer: CachedAnswer, size: tuple[int, int], config: ProjectConfig) -> Detections:
        """A batch answer as boxes in image pixels (parsing.py, like every Gemini answer)."""
        return self.detector.to_detections(answer, size, config, None, cached=False, started=time.monotonic(),
                                           attempts=1, tier="batch")

    def cancel(self, name: str) -> None:
        self.detector.client.batches.cancel(name=name)
