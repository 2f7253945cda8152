"""Gemini as a zero-shot detector: one instance per process, shared by a thread pool.

``detect`` either returns Detections in the caller's image pixels or raises
:class:`GeminiUnavailable` with a reason, and the caller falls back to YOLO. Around the one
``generateContent`` call sit, in order: the answer cache (a hit costs nothing, so it is served
even when the budget is spent or the breaker is open), the daily budget, the circuit breaker,
and retries with backoff that honour the 429 ``RetryInfo`` inside one per-task deadline. Bulk work
may ask the Flex tier first: a refused Flex call (429/503) is retried on Flex with jittered backoff
(at least the server's wait), at most ``GEMINI_FLEX_RETRIES`` times and all within ``GEMINI_FLEX_TIMEOUT_S``;
only then, or on a timeout, does the task go to the standard calls (docs/gemini.md#batch-api-and-flex).
A refused call is billed nothing, so retrying on Flex keeps the task at the Flex price. Request building lives in
request.py and error mapping in errors.py, shared with the Batch API path (batch.py).
The API key is never logged: only model, outcome, latency and tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis as redis_lib
from google import genai
from google.genai import errors, types
from PIL import Image
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from backend.core import keys
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.metrics import GEMINI_CALLS, GEMINI_DROPPED, GEMINI_FLEX_FALLBACKS, GEMINI_FLEX_RETRIES
from backend.core.settings import Settings
from backend.detectors.gemini.breaker import CircuitBreaker
from backend.detectors.gemini.cache import AnswerCache, CachedAnswer
from backend.detectors.gemini.cost import CostTracker, Usage
from backend.detectors.gemini.errors import (  # noqa: F401 - re-exported: callers import them from the client
    REASONS,
    DeadlineReached,
    GeminiUnavailable,
    classify,
    retry_delay_seconds,
    retryable,
)
from backend.detectors.gemini.parsing import BadAnswer, parse_answer
from backend.detectors.gemini.request import (  # noqa: F401 - re-exported: callers import them from the client
    RESPONSE_FORMAT_VERSION,
    answer_params,
    best_label,
    build_prompt,
    clip,
    contents,
    encode_image,
    generation_config,
    thinking_off_supported,
)

log = logging.getLogger(__name__)

MIN_ATTEMPT_SECONDS = 0.25  # less time left than this: no point starting another call
_BLOCK_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "RECITATION"}
#: Flex refusals that send the task to the standard tier (docs/gemini.md#batch-api-and-flex).
_FLEX_REFUSALS = {"rate_limited", "server_error", "timeout"}
#: Flex refusals retried on Flex first; a timeout has used the Flex time already.
_FLEX_RETRIED = {"rate_limited", "server_error"}
FLEX_BACKOFF_S = 0.5  # first wait after a refused Flex call (then x2, plus up to as much jitter)
FLEX_BACKOFF_MAX_S = 8.0


@dataclass(frozen=True)
class Prepared:
    """One task's request, before any call: what the synchronous and the batch paths both send."""

    system: str
    prompt: str
    cache_key: str
    fallback_label: str | None


# --- the detector --------------------------------------------------------------------------------

class GeminiDetector:
    """Zero-shot boxes (and masks) from Gemini; see the module docstring for the call pipeline."""

    source = "gemini"

    def __init__(
        self,
        settings: Settings,
        redis: redis_lib.Redis | None = None,
        *,
        prefix: str = keys.Keys.GEMINI_ROOT,
        sleep: Callable[[float], None] = time.sleep,
        tier: str = "standard",
    ) -> None:
        """``tier``: the synchronous tier :meth:`detect` uses by default ("flex" only for bulk work)."""
        self.settings = settings
        self.tier = tier
        self.model = settings.gemini_model
        self._key = settings.gemini_api_key.get_secret_value().strip()
        self._sleep = sleep
        self.cache = AnswerCache(redis, settings.gemini_cache_ttl, prefix=keys.gemini_answers(prefix))
        self.cost = CostTracker(settings, redis, prefix=keys.gemini_spend(prefix))
        self.breaker = CircuitBreaker(
            settings.gemini_breaker_failures, settings.gemini_breaker_cooldown, redis,
            prefix=keys.gemini_breaker(prefix), trial_lease=settings.gemini_task_deadline + 5.0,
        )
        self._client: genai.Client | None = None
        self._why_off = ""
        if not settings.gemini_enabled:
            self._why_off = "no GEMINI_API_KEY / GOOGLE_API_KEY and GOOGLE_GENAI_USE_VERTEXAI is off"
            return
        http_options = types.HttpOptions(
            base_url=settings.gemini_base_url or None,
            api_version=settings.gemini_api_version or None,
            timeout=int(settings.gemini_timeout * 1000),
        )
        try:
            if settings.google_genai_use_vertexai:  # project/location come from the SDK's env vars
                self._client = genai.Client(vertexai=True, api_key=self._key or None, http_options=http_options)
            else:
                self._client = genai.Client(vertexai=False, api_key=self._key, http_options=http_options)
        except Exception as exc:  # e.g. Vertex without credentials: Gemini stays off, YOLO serves
            self._why_off = f"client setup failed: {self._redact(str(exc))}"
            log.warning("gemini: %s", self._why_off)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # public API
    def detect(self, image: Image.Image, image_sha256: str, config: ProjectConfig, query: str | None = None,
               tier: str | None = None) -> Detections:
        """Boxes on ``image`` (RGB, EXIF-transposed) in its own pixels, or :class:`GeminiUnavailable`.

        ``tier`` "flex" asks the cheaper Flex tier first and falls back to standard (bulk work only);
        default: the detector's own tier (standard unless built for bulk work)."""
        if self._client is None:
            raise GeminiUnavailable("not_configured", self._why_off)
        started = time.monotonic()
        tier = tier or self.tier
        prepared = self.prepare(config, query, image_sha256)

        cached = self.cache.get(prepared.cache_key)
        if cached is not None:
            detections = self.to_detections(cached, image.size, config, prepared.fallback_label, cached=True,
                                            started=started, attempts=0, tier="cache")
            self._log_outcome("cache_hit", started, 0, None, len(detections), image_sha256)
            return detections

        self.check_allowed()
        attempts = [0]
        answered = ["standard"]
        try:
            answer = self._ask(encode_image(image, self.settings.gemini_max_image_side), prepared, started, attempts,
                               tier, answered)
            detections = self.to_detections(answer, image.size, config, prepared.fallback_label, cached=False,
                                            started=started, attempts=attempts[0], tier=answered[0])
        except GeminiUnavailable as exc:
            (self.breaker.record_failure if exc.service_fault else self.breaker.record_success)()
            self._log_outcome(exc.reason, started, attempts[0], None, 0, image_sha256)
            raise
        self.breaker.record_success()
        self.cache.put(prepared.cache_key, answer)
        self._log_outcome("ok", started, attempts[0], answer.usage, len(detections), image_sha256)
        return detections

    def prepare(self, config: ProjectConfig, query: str | None, image_sha256: str) -> Prepared:
        """The prompt and cache key of one task (the batch path sends the same, see batch.py)."""
        query = (query or "").strip() or None
        limit = self.settings.prompt_max_chars
        if query and len(query) > limit:
            log.info("gemini: interactive query of %d characters cut to PROMPT_MAX_CHARS=%d", len(query), limit)
            query = clip(query, limit)
        masks = config.wants_masks
        system, prompt = build_prompt(config, query, self.settings.gemini_max_objects, masks, limit)
        key = self.cache.key(image_sha256, f"{system}\n\n{prompt}", self.model, answer_params(self.settings, self.model, masks))
        return Prepared(system, prompt, key, best_label(config, query) if query else None)

    def check_allowed(self) -> None:
        """Raise :class:`GeminiUnavailable` when the budget is spent or the breaker is open."""
        if self.cost.budget_exhausted():
            raise GeminiUnavailable("budget", f"daily Gemini budget of ${self.settings.gemini_daily_budget_usd:.2f} is spent")
        if not self.breaker.allow():
            raise GeminiUnavailable("circuit_open",
                                    f"Gemini failed {self.settings.gemini_breaker_failures} tasks in a row; skipped for a while")

    @property
    def client(self) -> genai.Client:
        if self._client is None:
            raise GeminiUnavailable("not_configured", self._why_off)
        return self._client

    # calls
    def _ask(self, jpeg: bytes, prepared: Prepared, started: float, attempts: list[int], tier: str,
             answered: list[str]) -> CachedAnswer:
        """Flex first when asked (retried on refusals within its own time), then standard calls with retries."""
        parts = contents(jpeg, prepared.prompt)
        if tier == "flex":
            response = self._ask_flex(parts, prepared.system, attempts)
            if response is not None:
                answered[0] = "flex"
                return self.read_response(response, "flex")
            started = time.monotonic()  # the standard tier gets the task's whole deadline
        return self._ask_standard(parts, prepared.system, started, attempts)

    def _ask_flex(self, parts: list, system: str, attempts: list[int]) -> types.GenerateContentResponse | None:
        """Flex calls of one task, or None when the task goes to the standard tier.

        A 429/503 (or a dropped connection) is retried on Flex after a jittered backoff of at least the
        server's RetryInfo / Retry-After, at most GEMINI_FLEX_RETRIES times, and every call and wait fits in
        GEMINI_FLEX_TIMEOUT_S: a wait that would not fit falls back at once. Refused calls are billed nothing
        (no usageMetadata), so a task answered by a retry is charged once, at the Flex price; before, about
        10% refusals sent 10% of the tasks to the standard price (issue 16)."""
        budget = self.settings.gemini_flex_timeout_s
        deadline = time.monotonic() + budget
        backoff = wait_exponential_jitter(initial=FLEX_BACKOFF_S, max=FLEX_BACKOFF_MAX_S, jitter=FLEX_BACKOFF_S)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return max(backoff(state), retry_delay_seconds(exc) or 0.0)

        def stop(state: RetryCallState) -> bool:
            return (state.attempt_number > self.settings.gemini_flex_retries
                    or time.monotonic() + state.upcoming_sleep + MIN_ATTEMPT_SECONDS > deadline)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = classify(exc) if exc else "?"
            GEMINI_FLEX_RETRIES.labels(reason=reason).inc()
            log.info("gemini %s: flex attempt %d refused (%s), retrying on flex in %.2fs", self.model,
                     state.attempt_number, reason, state.upcoming_sleep)

        retrying = Retrying(retry=retry_if_exception(lambda exc: classify(exc) in _FLEX_RETRIED), wait=wait, stop=stop,
                            sleep=self._sleep, before_sleep=before_sleep, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    remaining = deadline - time.monotonic()
                    if remaining < MIN_ATTEMPT_SECONDS:
                        raise DeadlineReached()
                    attempts[0] += 1
                    return self._call(parts, generation_config(self.settings, self.model, system,
                                                               timeout=min(budget, remaining), tier="flex"))
        except Exception as exc:
            reason = "timeout" if isinstance(exc, DeadlineReached) else classify(exc)
            if reason not in _FLEX_REFUSALS:
                raise self._unavailable(exc, clamped=False) from None
            GEMINI_FLEX_FALLBACKS.labels(reason=reason).inc()
            log.info("gemini %s: flex refused (%s); the task goes to the standard tier", self.model, reason)
        return None

    def _ask_standard(self, parts: list, system: str, started: float, attempts: list[int]) -> CachedAnswer:
        """One task's standard calls: retries with jittered backoff (>= RetryInfo) inside the deadline."""
        deadline = started + self.settings.gemini_task_deadline
        backoff = wait_exponential_jitter(initial=0.5, max=8.0, jitter=0.5)
        clamped = [False]

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return max(backoff(state), retry_delay_seconds(exc) or 0.0)

        def stop(state: RetryCallState) -> bool:
            return time.monotonic() + state.upcoming_sleep + MIN_ATTEMPT_SECONDS > deadline

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("gemini %s attempt %d failed (%s), retrying in %.2fs", self.model, state.attempt_number,
                     classify(exc) if exc else "?", state.upcoming_sleep)

        retrying = Retrying(retry=retry_if_exception(retryable), wait=wait, stop=stop, sleep=self._sleep,
                            before_sleep=before_sleep, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    remaining = deadline - time.monotonic()
                    if remaining < MIN_ATTEMPT_SECONDS:
                        raise DeadlineReached()
                    timeout = min(self.settings.gemini_timeout, remaining)
                    clamped[0] = timeout < self.settings.gemini_timeout
                    attempts[0] += 1
                    response = self._call(parts, generation_config(self.settings, self.model, system, timeout=timeout))
        except Exception as exc:  # the final failure after retries, or a non-retryable one
            raise self._unavailable(exc, clamped=clamped[0]) from None
        return self.read_response(response, "standard")

    def _unavailable(self, exc: BaseException, *, clamped: bool) -> GeminiUnavailable:
        reason = classify(exc)
        if reason == "timeout" and clamped:
            reason = "deadline"  # the task's budget, not Gemini's own timeout, ran out
        if reason == "bad_answer" and not isinstance(exc, (ValueError, errors.APIError)):
            log.exception("gemini %s: unexpected error", self.model)
        message = self._redact(f"{type(exc).__name__}: {exc}")[:500]
        return GeminiUnavailable(reason, message, service_fault=reason != "bad_answer" or isinstance(exc, json.JSONDecodeError))

    def _call(self, parts: list, config: types.GenerateContentConfig) -> types.GenerateContentResponse:
        try:
            response = self.client.models.generate_content(model=self.model, contents=parts, config=config)
        except Exception as exc:
            GEMINI_CALLS.labels(model=self.model, outcome=classify(exc)).inc()
            raise
        return response

    def read_response(self, response: types.GenerateContentResponse, tier: str, *, charge: bool = True) -> CachedAnswer:
        """Account the call at ``tier``'s price, then extract the answer text; blocked prompts raise "blocked".

        ``charge=False``: a batch's answer, whose spend is settled as a whole (CostTracker.settle)."""
        usage = Usage.from_metadata(response.usage_metadata)
        self.cost.record(self.model, usage, tier=tier, charge=charge)
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason:
            GEMINI_CALLS.labels(model=self.model, outcome="blocked").inc()
            raise GeminiUnavailable("blocked", f"prompt blocked: {_enum(feedback.block_reason)}")
        if not response.candidates:
            GEMINI_CALLS.labels(model=self.model, outcome="blocked").inc()
            raise GeminiUnavailable("blocked", "no candidates in the answer")
        candidate = response.candidates[0]
        finish = _enum(candidate.finish_reason)
        parts = candidate.content.parts if candidate.content and candidate.content.parts else []
        text = "".join(p.text for p in parts if p.text and not p.thought)
        if not text.strip():
            outcome = "blocked" if finish in _BLOCK_FINISH else "bad_answer"
            GEMINI_CALLS.labels(model=self.model, outcome=outcome).inc()
            raise GeminiUnavailable(outcome, f"empty answer (finishReason {finish})")
        GEMINI_CALLS.labels(model=self.model, outcome="ok").inc()
        return CachedAnswer(text, usage, response.model_version or "", finish)

    # answer to detections
    def to_detections(self, answer: CachedAnswer, size: tuple[int, int], config: ProjectConfig,
                      fallback: str | None, *, cached: bool, started: float, attempts: int, tier: str) -> Detections:
        """Parse ``answer`` into boxes in image pixels; ``tier`` (standard, flex, batch, cache) goes into meta."""
        try:
            detections, stats = parse_answer(
                answer.text, size, config, max_objects=self.settings.gemini_max_objects,
                finish_reason=answer.finish_reason, model=answer.model_version or self.model,
                fallback_label=fallback,
            )
        except BadAnswer as exc:
            raise GeminiUnavailable("bad_answer", str(exc)[:300]) from None
        if not cached:
            for reason, count in stats.dropped.items():
                GEMINI_DROPPED.labels(reason=reason).inc(count)
        detections.meta.update(
            cached=cached, attempts=attempts, latency_s=round(time.monotonic() - started, 3),
            usage=answer.usage.to_dict(), cost_usd=0.0 if cached else self.cost.cost_usd(answer.usage, tier), tier=tier,
            finish_reason=answer.finish_reason, parse=stats.as_dict(),
        )
        return detections

    # logging
    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _log_outcome(self, outcome: str, started: float, attempts: int, usage: Usage | None, boxes: int, sha: str) -> None:
        u = usage or Usage()
        log.info(
            "gemini model=%s outcome=%s latency=%.2fs attempts=%d "
            "tokens_in=%d tokens_out=%d tokens_thinking=%d boxes=%d image=%s",
            self.model, outcome, time.monotonic() - started, attempts, u.prompt_tokens, u.output_tokens,
            u.thinking_tokens, boxes, sha[:12],
        )


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value) or "")
