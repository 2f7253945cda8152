"""The Batch API and the Flex tier of the fake Gemini server (tests/fake_gemini.py delegates here).

What the real API does at the HTTP level, as docs/gemini.md#batch-api-and-flex describes it:

- ``POST /{v}/models/{model}:batchGenerateContent`` with ``{"batch": {"displayName", "inputConfig":
  {"requests": {"requests": [{"request", "metadata"}]}}}}`` answers an operation ``{"name": "batches/<id>",
  "metadata": {"model", "displayName", "state", "createTime", ...}}``.
- ``GET /{v}/batches/<id>``: the state moves PENDING -> RUNNING -> SUCCEEDED over (configurable) time;
  a succeeded batch holds ``metadata.output.inlinedResponses.inlinedResponses[]``, each ``{"response",
  "metadata"}`` or ``{"error": {"code", "message"}, "metadata"}`` (a per-request failure). A batch not
  finished after ``expire_after_s`` is EXPIRED, without results.
- ``POST /{v}/batches/<id>:cancel`` (CANCELLED), ``DELETE /{v}/batches/<id>``, ``GET /{v}/batches``
  (``{"operations": [...]}``); an unknown id is 404 NOT_FOUND.
- Flex (``"serviceTier": "flex"`` in a generateContent body): the same answer after ``latency_s`` more,
  or, at ``refuse_rate``, a 429 RESOURCE_EXHAUSTED or 503 UNAVAILABLE.

This module knows nothing of the server's answer types: it returns :class:`Reply` objects that
:class:`tests.fake_gemini.FakeGemini` turns into HTTP answers, and asks the server for each inlined
request's answer through a callback (the same scripted FIFO and responder as generateContent).
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

_CREATE = re.compile(r"^/(?P<version>v1|v1beta)/models/(?P<model>[^/:]+):batchGenerateContent$")
_ONE = re.compile(r"^/(?P<version>v1|v1beta)/batches/(?P<id>[^/:]+)(?P<cancel>:cancel)?$")
_LIST = re.compile(r"^/(?P<version>v1|v1beta)/batches$")
TERMINAL = {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"}

#: (inner GenerateContentRequest body, model) -> (HTTP status, JSON body) of that request's answer.
InnerAnswer = Callable[[Mapping[str, Any], str], tuple[int, Any]]


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    delay: float = 0.0


def api_error(code: int, status: str, message: str) -> Reply:
    return Reply(code, {"error": {"code": code, "message": message, "status": status}})


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeBatch:
    name: str
    model: str
    display_name: str
    requests: list[dict]
    created: float = field(default_factory=time.monotonic)
    create_time: str = field(default_factory=_now_iso)
    forced: str | None = None  # a state set by the test or by cancel
    responses: list[dict] | None = None  # computed once, when the batch succeeds
    polls: int = 0


class FakeBatches:
    """Batch jobs of one fake server; timings and failures are plain attributes a test sets."""

    def __init__(self, inner: InnerAnswer) -> None:
        self._inner = inner
        self.pending_s = 0.0  # seconds in BATCH_STATE_PENDING
        self.running_s = 0.2  # then seconds in BATCH_STATE_RUNNING before SUCCEEDED
        self.expire_after_s: float | None = None  # not finished by then: BATCH_STATE_EXPIRED (real API: 48 h)
        self.fail_batch = False  # the whole batch ends BATCH_STATE_FAILED
        #: metadata -> an error ``{"code", "message"}`` for that request (a per-request failure), or None
        self.request_error: Callable[[Mapping[str, Any]], dict | None] = lambda metadata: None
        self.jobs: dict[str, FakeBatch] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def handles(self, method: str, path: str) -> bool:
        return bool((method == "POST" and _CREATE.match(path)) or _ONE.match(path) or (method == "GET" and _LIST.match(path)))

    def answer(self, method: str, path: str, body: Any) -> Reply:
        if (route := _CREATE.match(path)) and method == "POST":
            return self._create(route.group("model"), body)
        if route := _ONE.match(path):
            job = self.jobs.get(f"batches/{route.group('id')}")
            if job is None:
                return api_error(404, "NOT_FOUND", f"Requested entity was not found: batches/{route.group('id')}")
            if route.group("cancel") and method == "POST":
                return self._cancel(job)
            if method == "GET" and not route.group("cancel"):
                job.polls += 1
                return Reply(200, self._operation(job))
            if method == "DELETE" and not route.group("cancel"):
                with self._lock:
                    self.jobs.pop(job.name, None)
                return Reply(200, {})
        if method == "GET" and _LIST.match(path):
            return Reply(200, {"operations": [self._operation(job) for job in list(self.jobs.values())]})
        return api_error(404, "NOT_FOUND", f"Requested entity was not found: {method} {path}")

    # state
    def state(self, job: FakeBatch) -> str:
        if job.forced:
            return job.forced
        age = time.monotonic() - job.created
        done_at = self.pending_s + self.running_s
        if self.expire_after_s is not None and self.expire_after_s <= age and self.expire_after_s < done_at:
            job.forced = "BATCH_STATE_EXPIRED"
            return job.forced
        if age < self.pending_s:
            return "BATCH_STATE_PENDING"
        if age < done_at:
            return "BATCH_STATE_RUNNING"
        if self.fail_batch:
            job.forced = "BATCH_STATE_FAILED"
            return job.forced
        return "BATCH_STATE_SUCCEEDED"

    def force(self, name: str, state: str) -> None:
        """Put a batch in ``state`` (e.g. "BATCH_STATE_EXPIRED") whatever the clock says."""
        self.jobs[name].forced = state

    # routes
    def _create(self, model: str, body: Any) -> Reply:
        batch = body.get("batch") if isinstance(body, Mapping) else None
        requests = (((batch or {}).get("inputConfig") or {}).get("requests") or {}).get("requests")
        if not isinstance(requests, list) or not requests:
            return api_error(400, "INVALID_ARGUMENT", "batch.input_config.requests is required")
        name = f"batches/fake{next(self._ids):06d}"
        job = FakeBatch(name, f"models/{model}", str(batch.get("displayName") or ""), requests)
        with self._lock:
            self.jobs[name] = job
        return Reply(200, self._operation(job))

    def _cancel(self, job: FakeBatch) -> Reply:
        if self.state(job) not in TERMINAL:
            job.forced = "BATCH_STATE_CANCELLED"
        return Reply(200, {})

    def _operation(self, job: FakeBatch) -> dict:
        state = self.state(job)
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": job.model, "displayName": job.display_name, "state": state, "createTime": job.create_time,
            "updateTime": _now_iso(), "batchStats": {"requestCount": str(len(job.requests))},
        }
        operation: dict[str, Any] = {"name": job.name, "metadata": meta}
        if state in TERMINAL:
            meta["endTime"] = _now_iso()
            operation["done"] = True
        if state == "BATCH_STATE_SUCCEEDED":
            output = {"inlinedResponses": {"inlinedResponses": self._results(job)}}
            meta["output"] = output
            operation["response"] = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main."
                                              "GenerateContentBatchOutput", **output}
        return operation

    def _results(self, job: FakeBatch) -> list[dict]:
        with self._lock:
            if job.responses is None:
                out = []
                for item in job.requests:
                    metadata = item.get("metadata") or {}
                    failure = self.request_error(metadata)
                    if failure is None:
                        status, body = self._inner(item.get("request") or {}, job.model.removeprefix("models/"))
                        if status != 200:
                            failure = (body or {}).get("error") or {"code": status, "message": "failed"}
                    entry: dict[str, Any] = {"metadata": metadata}
                    if failure is not None:
                        entry["error"] = {"code": failure.get("code", 13), "message": failure.get("message", "")}
                    else:
                        entry["response"] = body
                    out.append(entry)
                job.responses = out
            return job.responses


class FlexTier:
    """Flex behaviour of generateContent: ``latency_s`` more, and refusals at ``refuse_rate`` (seeded)."""

    def __init__(self, latency_s: float = 0.0, refuse_rate: float = 0.0, seed: int = 0) -> None:
        self.latency_s = latency_s
        self.refuse_rate = refuse_rate
        self.refused = 0
        self.served = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def refusal(self) -> Reply | None:
        """A 429 or 503 for this call (then it got no answer), or None (it is served, ``latency_s`` later)."""
        with self._lock:
            if self._random.random() >= self.refuse_rate:
                self.served += 1
                return None
            self.refused += 1
            overloaded = self._random.random() < 0.5
        if overloaded:
            return api_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        return api_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (flex capacity). Please retry later.")


def is_flex(body: Any) -> bool:
    return isinstance(body, Mapping) and str(body.get("serviceTier") or body.get("service_tier") or "").lower() == "flex"
