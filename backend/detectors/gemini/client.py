"""Gemini as a zero-shot detector: one instance per process, shared by a thread pool.

``detect`` either returns Detections in the caller's image pixels or raises
:class:`GeminiUnavailable` with a reason, and the caller falls back to YOLO. Around the one
``generateContent`` call sit, in order: the answer cache (a hit costs nothing, so it is served
even when the budget is spent or the breaker is open), the daily budget, the circuit breaker,
and retries with backoff that honour the 429 ``RetryInfo`` inside one per-task deadline.
The API key is never logged: only model, outcome, latency and tokens.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import redis as redis_lib
from google import genai
from google.genai import errors, types
from PIL import Image
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from backend.core import keys
from backend.core.detections import Detections
from backend.core.geometry import scaled_size
from backend.core.label_config import ProjectConfig
from backend.core.metrics import GEMINI_CALLS, GEMINI_DROPPED
from backend.core.settings import Settings
from backend.detectors.gemini.breaker import CircuitBreaker
from backend.detectors.gemini.cache import AnswerCache, CachedAnswer
from backend.detectors.gemini.cost import CostTracker, Usage
from backend.detectors.gemini.parsing import BadAnswer, parse_answer

try:  # the SDK uses httpx2 when installed, else httpx; catch both families
    import httpx2 as _httpx2  # optional: the SDK uses httpx2 when installed
except ImportError:  # pragma: no cover
    _httpx2 = None
try:
    import httpx as _httpx  # optional: else httpx
except ImportError:  # pragma: no cover
    _httpx = None

log = logging.getLogger(__name__)

REASONS = (
    "not_configured", "budget", "circuit_open", "blocked", "timeout",
    "rate_limited", "server_error", "client_error", "bad_answer", "deadline",
)
# Bump when the prompt contract or parsing expectations change: old cached answers then miss.
RESPONSE_FORMAT_VERSION = 1
MIN_ATTEMPT_SECONDS = 0.25  # less time left than this: no point starting another call
JPEG_QUALITY = 90
_BLOCK_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "RECITATION"}
_SERVICE_FAILURES = {"timeout", "rate_limited", "server_error", "client_error", "deadline"}
_TIMEOUTS = tuple(m.TimeoutException for m in (_httpx2, _httpx) if m is not None)
_TRANSPORT = tuple(m.TransportError for m in (_httpx2, _httpx) if m is not None)


class GeminiUnavailable(Exception):
    """Gemini cannot serve this task; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str, *, service_fault: bool | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        # Does this count against Gemini's health (the breaker)? Default by reason.
        self.service_fault = reason in _SERVICE_FAILURES if service_fault is None else service_fault

    def __reduce__(self):  # picklable across processes (RQ jobs) despite the keyword-only flag
        return (_unavailable, (self.reason, self.message, self.service_fault))


def _unavailable(reason: str, message: str, service_fault: bool) -> GeminiUnavailable:
    return GeminiUnavailable(reason, message, service_fault=service_fault)


class _DeadlineReached(Exception):
    pass


# --- error classification -----------------------------------------------------------------------

def _classify(exc: BaseException) -> str:
    if isinstance(exc, errors.APIError):
        if exc.code == 429:
            return "rate_limited"
        if exc.code == 408 or (exc.code or 0) >= 500:
            return "server_error"
        return "client_error"
    if isinstance(exc, _DeadlineReached):
        return "deadline"
    if isinstance(exc, _TIMEOUTS):
        return "timeout"
    if isinstance(exc, _TRANSPORT):
        return "server_error"  # connection refused/reset/dropped
    return "bad_answer"  # json.JSONDecodeError on a non-JSON 200, invalid response shapes


def _retryable(exc: BaseException) -> bool:
    return _classify(exc) in ("rate_limited", "server_error", "timeout")


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*s\s*$")


def retry_delay_seconds(exc: BaseException | None) -> float | None:
    """The server's requested wait: ``google.rpc.RetryInfo.retryDelay`` ("37s"), else Retry-After."""
    if not isinstance(exc, errors.APIError):
        return None
    details = exc.details if isinstance(exc.details, dict) else {}
    body = details.get("error", details)
    for detail in (body.get("details") or []) if isinstance(body, dict) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        return float(headers.get("retry-after")) if headers.get("retry-after") else None
    except (TypeError, ValueError):
        return None


# --- prompt --------------------------------------------------------------------------------------

def thinking_off_supported(model: str) -> bool:
    """Only 2.5 Flash (and Flash-Lite) accept ``thinking_budget=0``; 2.5 Pro and 3.x reject it."""
    return "2.5-flash" in model.lower()


def clip(text: str, max_chars: int | None) -> str:
    """``text`` cut to ``max_chars`` characters (PROMPT_MAX_CHARS; None = as is): request data sets hints and
    queries, and every character is paid for and makes a new cache key."""
    return text if max_chars is None or len(text) <= max_chars else text[:max_chars].rstrip()


def _label_lines(config: ProjectConfig, max_chars: int | None = None) -> str:
    return "\n".join(
        f"- {label.value}: {clip(label.hint, max_chars)}" if label.hint and label.hint != label.value else f"- {label.value}"
        for label in config.labels
    )


def best_label(config: ProjectConfig, query: str) -> str:
    """The label an interactive query talks about (its name, predicted value or hint), else the first."""
    text = f" {re.sub(r'[^a-z0-9]+', ' ', query.lower())} "
    for label in config.labels:
        for name in (label.value, *label.predicted_values, label.hint):
            words = re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()
            if words and (f" {words} " in text or f" {words}s " in text):
                return label.value
    return config.labels[0].value


def build_prompt(config: ProjectConfig, query: str | None, max_objects: int, masks: bool,
                 max_chars: int | None = None) -> tuple[str, str]:
    """``(system_instruction, user_prompt)`` after Google's detection recipe (docs/gemini.md#prompt-recipe).

    Each hint and the query are cut to ``max_chars`` characters."""
    keys = '"box_2d", "mask" and "label"' if masks else '"box_2d" and "label"'
    system = (
        "You detect objects in images for a labeling tool. Answer with a JSON array only: no code "
        f"fences, no prose. Each element is an object with the keys {keys}. \"box_2d\" is "
        "[ymin, xmin, ymax, xmax] as integers normalized to 0-1000. \"label\" is one of the label "
        "names given, spelled exactly as given. Give each visible instance its own element and "
        f"never repeat an element. Limit to {max_objects} objects. If nothing matches, answer []."
    )
    if masks:
        system += " \"mask\" is the segmentation mask of the object inside its box."
    labels = _label_lines(config, max_chars)
    if query:
        prompt = (
            f"Find: {clip(query.strip(), max_chars)}\n"
            f"Label each object found with the best fitting name from this list (name: description):\n{labels}\n"
            f"If none fits, use \"{best_label(config, query)}\"."
        )
    else:
        prompt = f"Detect every instance of these labels (name: what to look for):\n{labels}"
    return system, prompt


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
    ) -> None:
        self.settings = settings
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
    def detect(self, image: Image.Image, image_sha256: str, config: ProjectConfig, query: str | None = None) -> Detections:
        """Boxes on ``image`` (RGB, EXIF-transposed) in its own pixels, or :class:`GeminiUnavailable`."""
        if self._client is None:
            raise GeminiUnavailable("not_configured", self._why_off)
        started = time.monotonic()
        query = (query or "").strip() or None
        limit = self.settings.prompt_max_chars
        if query and len(query) > limit:
            log.info("gemini: interactive query of %d characters cut to PROMPT_MAX_CHARS=%d", len(query), limit)
            query = clip(query, limit)
        masks = config.wants_masks
        system, prompt = build_prompt(config, query, self.settings.gemini_max_objects, masks, limit)
        key = self.cache.key(image_sha256, f"{system}\n\n{prompt}", self.model, self._answer_params(masks))
        fallback = best_label(config, query) if query else None

        cached = self.cache.get(key)
        if cached is not None:
            detections = self._to_detections(cached, image.size, config, fallback, cached=True, started=started, attempts=0)
            self._log_outcome("cache_hit", started, 0, None, len(detections), image_sha256)
            return detections

        if self.cost.budget_exhausted():
            raise GeminiUnavailable("budget", f"daily Gemini budget of ${self.settings.gemini_daily_budget_usd:.2f} is spent")
        if not self.breaker.allow():
            raise GeminiUnavailable("circuit_open",
                                    f"Gemini failed {self.settings.gemini_breaker_failures} tasks in a row; skipped for a while")

        attempts = [0]
        try:
            answer = self._ask(self._encode(image), system, prompt, started, attempts)
            detections = self._to_detections(answer, image.size, config, fallback, cached=False, started=started,
                                             attempts=attempts[0])
        except GeminiUnavailable as exc:
            (self.breaker.record_failure if exc.service_fault else self.breaker.record_success)()
            self._log_outcome(exc.reason, started, attempts[0], None, 0, image_sha256)
            raise
        self.breaker.record_success()
        self.cache.put(key, answer)
        self._log_outcome("ok", started, attempts[0], answer.usage, len(detections), image_sha256)
        return detections

    # request
    def _answer_params(self, masks: bool) -> dict[str, Any]:
        s = self.settings
        return {
            "format": RESPONSE_FORMAT_VERSION, "max_image_side": s.gemini_max_image_side,
            "max_objects": s.gemini_max_objects, "temperature": s.gemini_temperature,
            "max_output_tokens": s.gemini_max_output_tokens, "thinking_off": thinking_off_supported(self.model),
            "masks": masks,
        }

    def _encode(self, image: Image.Image) -> bytes:
        """Downscaled JPEG: Gemini's 0-1000 grid is relative, so a kept aspect maps back exactly."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = scaled_size(image.width, image.height, self.settings.gemini_max_image_side)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def _config(self, system: str, timeout: float) -> types.GenerateContentConfig:
        s = self.settings
        return types.GenerateContentConfig(
            system_instruction=system,
            temperature=s.gemini_temperature,
            max_output_tokens=s.gemini_max_output_tokens,
            response_mime_type="application/json",
            thinking_config=types.ThinkingConfig(thinking_budget=0) if thinking_off_supported(self.model) else None,
            http_options=types.HttpOptions(timeout=max(1, int(timeout * 1000))),
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )

    def _ask(self, jpeg: bytes, system: str, prompt: str, started: float, attempts: list[int]) -> CachedAnswer:
        """One task's calls: retries with jittered backoff (>= RetryInfo) inside the deadline."""
        deadline = started + self.settings.gemini_task_deadline
        contents = [types.Part.from_bytes(data=jpeg, mime_type="image/jpeg"), prompt]
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
                     _classify(exc) if exc else "?", state.upcoming_sleep)

        retrying = Retrying(retry=retry_if_exception(_retryable), wait=wait, stop=stop, sleep=self._sleep,
                            before_sleep=before_sleep, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    remaining = deadline - time.monotonic()
                    if remaining < MIN_ATTEMPT_SECONDS:
                        raise _DeadlineReached()
                    timeout = min(self.settings.gemini_timeout, remaining)
                    clamped[0] = timeout < self.settings.gemini_timeout
                    attempts[0] += 1
                    response = self._call(contents, self._config(system, timeout))
        except Exception as exc:  # the final failure after retries, or a non-retryable one
            reason = _classify(exc)
            if reason == "timeout" and clamped[0]:
                reason = "deadline"  # the task's budget, not Gemini's own timeout, ran out
            if reason == "bad_answer" and not isinstance(exc, (ValueError, errors.APIError)):
                log.exception("gemini %s: unexpected error", self.model)
            message = self._redact(f"{type(exc).__name__}: {exc}")[:500]
            raise GeminiUnavailable(reason, message,
                                    service_fault=reason != "bad_answer" or isinstance(exc, json.JSONDecodeError)) from None
        return self._read(response)

    def _call(self, contents: list, config: types.GenerateContentConfig) -> types.GenerateContentResponse:
        try:
            response = self._client.models.generate_content(model=self.model, contents=contents, config=config)  # type: ignore[union-attr]
        except Exception as exc:
            GEMINI_CALLS.labels(model=self.model, outcome=_classify(exc)).inc()
            raise
        return response

    def _read(self, response: types.GenerateContentResponse) -> CachedAnswer:
        """Account the call, then extract the answer text; blocked prompts raise "blocked"."""
        usage = Usage.from_metadata(response.usage_metadata)
        self.cost.record(self.model, usage)
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
    def _to_detections(self, answer: CachedAnswer, size: tuple[int, int], config: ProjectConfig,
                       fallback: str | None, *, cached: bool, started: float, attempts: int) -> Detections:
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
            usage=answer.usage.to_dict(), cost_usd=0.0 if cached else self.cost.cost_usd(answer.usage),
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
