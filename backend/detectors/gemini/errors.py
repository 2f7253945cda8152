"""What a failed Gemini call means: the reason codes, which ones retry, and the server's requested wait.

Split from the client so the synchronous path (client.py) and the Batch API path (batch.py) map
failures the same way (docs/gemini.md#errors-and-retries).
"""

from __future__ import annotations

import re

from google.genai import errors

try:  # the SDK uses httpx2 when installed, else httpx; catch both families
    import httpx2 as _httpx2  # optional: the SDK uses httpx2 when installed
except ImportError:  # pragma: no cover
    _httpx2 = None
try:
    import httpx as _httpx  # optional: else httpx
except ImportError:  # pragma: no cover
    _httpx = None

REASONS = (
    "not_configured", "budget", "circuit_open", "blocked", "timeout",
    "rate_limited", "server_error", "client_error", "bad_answer", "deadline",
)
SERVICE_FAILURES = {"timeout", "rate_limited", "server_error", "client_error", "deadline"}
TIMEOUTS = tuple(m.TimeoutException for m in (_httpx2, _httpx) if m is not None)
TRANSPORT = tuple(m.TransportError for m in (_httpx2, _httpx) if m is not None)


class GeminiUnavailable(Exception):
    """Gemini cannot serve this task; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str, *, service_fault: bool | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        # Does this count against Gemini's health (the breaker)? Default by reason.
        self.service_fault = reason in SERVICE_FAILURES if service_fault is None else service_fault

    def __reduce__(self):  # picklable across processes (RQ jobs) despite the keyword-only flag
        return (_unavailable, (self.reason, self.message, self.service_fault))


def _unavailable(reason: str, message: str, service_fault: bool) -> GeminiUnavailable:
    return GeminiUnavailable(reason, message, service_fault=service_fault)


class DeadlineReached(Exception):
    """The task's own time ran out before another call could start."""


def classify(exc: BaseException) -> str:
    """The reason code of an exception raised by one ``generateContent`` call."""
    if isinstance(exc, errors.APIError):
        if exc.code == 429:
            return "rate_limited"
        if exc.code == 408 or (exc.code or 0) >= 500:
            return "server_error"
        return "client_error"
    if isinstance(exc, DeadlineReached):
        return "deadline"
    if isinstance(exc, TIMEOUTS):
        return "timeout"
    if isinstance(exc, TRANSPORT):
        return "server_error"  # connection refused/reset/dropped
    return "bad_answer"  # json.JSONDecodeError on a non-JSON 200, invalid response shapes


def retryable(exc: BaseException) -> bool:
    return classify(exc) in ("rate_limited", "server_error", "timeout")


def reason_of_status(code: int | None) -> str:
    """The reason code of an HTTP status inside a Batch API answer (a per-request ``error``)."""
    if code == 429 or code == 8:  # HTTP 429, or google.rpc.Code RESOURCE_EXHAUSTED
        return "rate_limited"
    if code in (408, 4) or (code or 0) >= 500 or code in (13, 14):  # DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE
        return "server_error"
    return "client_error"


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
