"""A fake Gemini API server for tests, driven through the real google-genai client.

Why a server and not a mock: the SDK's request building (camelCase/snake_case mix, base64 image
parts, per-request timeouts), its error mapping (``ClientError``/``ServerError``, httpx timeouts,
``json.JSONDecodeError`` on a non-JSON 200) and its response parsing are exactly what production
code must survive, so tests point ``HttpOptions(base_url=fake.base_url)`` here instead.

Serves ``POST /{v1,v1beta}/models/{model}:generateContent`` as docs/gemini.md describes it:
``x-goog-api-key`` checked (wrong key: 400 INVALID_ARGUMENT, missing: 403 PERMISSION_DENIED),
answers from a FIFO of scripted :class:`Answer` objects, then from a ``responder`` callable.
The Batch API endpoints (``fake.batches``) and the Flex tier (``fake.flex``) live in
tests/fake_gemini_batch.py; each inlined batch request is answered like a generateContent call.
Every request is recorded (path, all headers, JSON body, decoded images) in a thread-safe list.

Usage::

    with FakeGemini(api_key="k") as fake:
        fake.script(rate_limited("1s"), ok('[{"box_2d": [0, 0, 500, 500], "label": "cat"}]'))
        client = genai.Client(api_key="k", http_options=HttpOptions(base_url=fake.base_url))

or the ``fake_gemini`` pytest fixture (import it into the test module).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.core.geometry import xyxy_to_gemini
from tests.fake_gemini_batch import FakeBatches, FlexTier, Reply, is_flex

log = logging.getLogger(__name__)

DEFAULT_KEY = "fake-gemini-key-0123456789"
DEFAULT_MODEL_VERSION = "gemini-2.5-flash"
_ROUTE = re.compile(r"^/(?P<version>v1|v1beta)/models/(?P<model>[^/:]+):generateContent$")


# --- answers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """One scripted HTTP answer. ``body`` dict/list is sent as JSON, bytes/str as is."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (slowness, client timeouts)
    drop: bool = False  # close the connection without any response
    content_type: str = "application/json; charset=UTF-8"

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


def usage(prompt_tokens: int = 300, output_tokens: int = 50, thoughts_tokens: int = 0) -> dict:
    meta = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens + thoughts_tokens,
        "promptTokensDetails": [{"modality": "IMAGE", "tokenCount": max(prompt_tokens - 42, 0)},
                                {"modality": "TEXT", "tokenCount": min(42, prompt_tokens)}],
    }
    if thoughts_tokens:
        meta["thoughtsTokenCount"] = thoughts_tokens
    return meta


def ok(
    text: str,
    *,
    prompt_tokens: int = 300,
    output_tokens: int | None = None,
    thoughts_tokens: int = 0,
    finish_reason: str = "STOP",
    model_version: str = DEFAULT_MODEL_VERSION,
) -> Answer:
    """A successful answer whose single candidate holds ``text``."""
    out = output_tokens if output_tokens is not None else max(1, len(text) // 4)
    return Answer(body={
        "candidates": [{
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": finish_reason,
            "index": 0,
        }],
        "usageMetadata": usage(prompt_tokens, out, thoughts_tokens),
        "modelVersion": model_version,
        "responseId": f"fake-{time.monotonic_ns()}",
    })


def boxes(objects: Sequence[Mapping[str, Any]], **kwargs: Any) -> Answer:
    """A successful answer with ``objects`` serialised as Gemini's JSON array."""
    return ok(json.dumps(list(objects)), **kwargs)


def truncated(text: str, keep_chars: int, **kwargs: Any) -> Answer:
    """An answer cut at ``keep_chars`` with ``finishReason: MAX_TOKENS`` (incomplete JSON)."""
    return ok(text[:keep_chars], finish_reason="MAX_TOKENS", **kwargs)


def blocked(reason: str = "SAFETY", *, prompt_tokens: int = 300, model_version: str = DEFAULT_MODEL_VERSION) -> Answer:
    """A blocked prompt: ``promptFeedback.blockReason`` and no candidates at all."""
    return Answer(body={
        "promptFeedback": {"blockReason": reason, "safetyRatings": []},
        "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
        "modelVersion": model_version,
    })


def error(code: int, status: str, message: str, details: Iterable[Mapping[str, Any]] = (), **kwargs: Any) -> Answer:
    """A Google API error body ``{"error": {code, message, status, details}}``."""
    body: dict[str, Any] = {"code": code, "message": message, "status": status}
    details = list(details)
    if details:
        body["details"] = details
    return Answer(status=code, body={"error": body}, **kwargs)


def rate_limited(retry_delay: str | None = "37s",
                 message: str = "You exceeded your current quota, please check your plan and billing details.") -> Answer:
    """429 RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` detail (``retryDelay`` like "37s")."""
    details: list[dict] = [{
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}],
    }]
    if retry_delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    return error(429, "RESOURCE_EXHAUSTED", message, details)


def server_error(code: int = 503) -> Answer:
    """500 INTERNAL or 503 UNAVAILABLE ("model is overloaded"), as Gemini sends them."""
    if code == 503:
        return error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
    if code == 504:
        return error(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.")
    return error(code, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting")


def bad_request(message: str = "Request contains an invalid argument.") -> Answer:
    return error(400, "INVALID_ARGUMENT", message)


def invalid_key() -> Answer:
    """What the real API answers to a wrong key: 400 (not 401) with ErrorInfo API_KEY_INVALID."""
    return error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com",
         "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
         "message": "API key not valid. Please pass a valid API key."},
    ])


def missing_key() -> Answer:
    return error(403, "PERMISSION_DENIED",
                 "Method doesn't allow unregistered callers (callers without established identity). "
                 "Please use API Key or other form of API consumer identity to call this API.")


def non_json(body: str = "<html><body>502 Bad Gateway</body></html>") -> Answer:
    """A 200 whose body is not JSON (a broken proxy): the SDK raises ``json.JSONDecodeError``."""
    return Answer(status=200, body=body, content_type="text/html; charset=UTF-8")


def delayed(answer: Answer, seconds: float) -> Answer:
    """``answer`` sent ``seconds`` after the request arrived (longer than the client timeout = a timeout)."""
    return replace(answer, delay=seconds)


def drop() -> Answer:
    """Close the connection without answering (httpx raises a RemoteProtocolError)."""
    return Answer(drop=True)


def empty() -> Answer:
    """A plain ``[]``: Gemini found nothing."""
    return ok("[]", output_tokens=2)


# --- requests ------------------------------------------------------------------------------------

@dataclass
class FakeRequest:
    """One request as the server saw it. ``headers`` are kept verbatim (the key included)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw: bytes
    body: Any
    version: str = ""
    model: str = ""
    images: list[Image.Image] = field(default_factory=list)
    image_mime_types: list[str] = field(default_factory=list)
    prompt: str = ""
    system_instruction: str = ""
    generation_config: dict = field(default_factory=dict)
    received_at: float = field(default_factory=time.monotonic)
    status: int = 0  # what the fake answered (0 = dropped)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    @property
    def api_key(self) -> str | None:
        return self.header("x-goog-api-key") or (self.query.get("key") or [None])[0]

    @property
    def image(self) -> Image.Image | None:
        return self.images[0] if self.images else None

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.image.size if self.image is not None else None

    @property
    def is_generate(self) -> bool:
        return bool(self.model)

    def config(self, *names: str, default: Any = None) -> Any:
        """A generation-config value by any of its spellings (``thinkingConfig``/``thinking_config``)."""
        return _lookup(self.generation_config, names, default)

    @property
    def temperature(self) -> float | None:
        return self.config("temperature")

    @property
    def thinking_budget(self) -> int | None:
        thinking = self.config("thinkingConfig", "thinking_config", default={}) or {}
        return _lookup(thinking, ("thinkingBudget", "thinking_budget"), None)

    @property
    def response_mime_type(self) -> str | None:
        return self.config("responseMimeType", "response_mime_type")

    @property
    def service_tier(self) -> str:
        """``serviceTier`` of the body ("" = the default, standard)."""
        body = self.body if isinstance(self.body, Mapping) else {}
        return str(_lookup(body, ("serviceTier", "service_tier"), "") or "")

    @property
    def all_text(self) -> str:
        return f"{self.system_instruction}\n{self.prompt}"


def _lookup(mapping: Mapping, names: Sequence[str], default: Any) -> Any:
    for name in names:
        if isinstance(mapping, Mapping) and name in mapping:
            return mapping[name]
    return default


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Mapping):
        return []
    return [p["text"] for p in content.get("parts", []) if isinstance(p, Mapping) and isinstance(p.get("text"), str)]


def _decode(req: FakeRequest) -> None:
    """Fill the convenience fields (images, prompt, config) from the JSON body."""
    body = req.body if isinstance(req.body, Mapping) else {}
    texts: list[str] = []
    for content in body.get("contents", []) or []:
        texts.extend(_texts(content))
        for part in (content.get("parts", []) if isinstance(content, Mapping) else []):
            inline = _lookup(part, ("inlineData", "inline_data"), None) if isinstance(part, Mapping) else None
            if not isinstance(inline, Mapping):
                continue
            data = str(inline.get("data", ""))
            try:  # the SDK sends URL-safe base64; accept the standard alphabet too
                raw = base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_") + "=" * (-len(data) % 4))
                img = Image.open(io.BytesIO(raw))
                img.load()
            except Exception:  # keep the request recorded even with a broken image
                continue
            req.images.append(img)
            req.image_mime_types.append(str(_lookup(inline, ("mimeType", "mime_type"), "")))
    req.prompt = "\n".join(texts)
    system = _lookup(body, ("systemInstruction", "system_instruction"), None)
    req.system_instruction = "\n".join(_texts(system))
    req.generation_config = dict(_lookup(body, ("generationConfig", "generation_config"), {}) or {})


# --- the server ----------------------------------------------------------------------------------

Responder = Callable[[FakeRequest], Answer]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 resets bursts of concurrent connections


class FakeGemini:
    """A local Gemini endpoint: a context manager, also usable via start()/stop()."""

    def __init__(self, api_key: str = DEFAULT_KEY, responder: Responder | None = None) -> None:
        self.api_key = api_key
        self.responder: Responder = responder or (lambda request: empty())
        self._queue: deque[Answer] = deque()
        self._requests: list[FakeRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.batches = FakeBatches(self._answer_inner)
        self.flex = FlexTier()

    # lifecycle
    def start(self) -> FakeGemini:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="fake-gemini")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeGemini is not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # scripting
    def script(self, *answers: Answer) -> None:
        """Queue answers; each generateContent call with a valid key takes the next one."""
        with self._lock:
            self._queue.extend(answers)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _next_answer(self, request: FakeRequest) -> Answer:
        with self._lock:
            scripted = self._queue.popleft() if self._queue else None
        if scripted is not None:
            return scripted
        try:
            return self.responder(request)
        except Exception as exc:  # a broken responder is a test bug: make it loud but answer
            log.exception("fake gemini responder failed")
            return error(500, "INTERNAL", f"fake responder failed: {exc!r}")

    # records
    def _record(self, request: FakeRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[FakeRequest]:
        """Every request received so far (a copy), including rejected ones."""
        with self._lock:
            return list(self._requests)

    @property
    def calls(self) -> list[FakeRequest]:
        """Only generateContent requests."""
        return [r for r in self.requests if r.is_generate]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._queue.clear()

    def answer(self, request: FakeRequest) -> Answer:
        """Route, authenticate, then pick the scripted or computed answer."""
        route = _ROUTE.match(request.path)
        batch = self.batches.handles(request.method, request.path)
        if (request.method != "POST" or route is None) and not batch:
            return error(404, "NOT_FOUND", f"Requested entity was not found: {request.method} {request.path}")
        if not batch:  # a generateContent call, refused or not (FakeGemini.calls)
            request.version, request.model = route.group("version"), route.group("model")
        key = request.api_key
        if not key:
            return missing_key()
        if key != self.api_key:
            return invalid_key()
        if batch:
            if request.method == "POST" and not isinstance(request.body, Mapping) and request.path.endswith("Content"):
                return bad_request("Invalid JSON payload received.")
            return _from_reply(self.batches.answer(request.method, request.path, request.body))
        if not isinstance(request.body, Mapping):
            return bad_request("Invalid JSON payload received.")
        if is_flex(request.body):
            refused = self.flex.refusal()
            if refused is not None:
                return _from_reply(refused)
            answer = self._next_answer(request)
            return replace(answer, delay=answer.delay + self.flex.latency_s)
        return self._next_answer(request)

    def _answer_inner(self, body: Mapping[str, Any], model: str) -> tuple[int, Any]:
        """One inlined batch request answered like a generateContent call (scripted FIFO, then responder)."""
        request = FakeRequest("POST", f"/v1beta/models/{model}:batchGenerateContent#inlined", {}, {}, b"", body)
        _decode(request)
        request.model = model
        answer = self._next_answer(request)
        return answer.status, json.loads(answer.encoded() or b"null") if answer.status else None


def _from_reply(reply: Reply) -> Answer:
    return Answer(status=reply.status, body=reply.body, delay=reply.delay)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeGemini
    server_version = "scaffolding on HTTPServer2"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        return

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        arrived = time.monotonic()  # a delay is Gemini's latency: it counts from here, like a server's
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        url = urlsplit(self.path)
        request = FakeRequest(method, url.path, parse_qs(url.query), dict(self.headers.items()), raw, body)
        if isinstance(body, Mapping):
            _decode(request)
        owner = self.owner
        owner._record(request)
        answer = owner.answer(request)
        if answer.delay and owner._stopping.wait(max(0.0, answer.delay - (time.monotonic() - arrived))):
            return
        if answer.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        request.status = answer.status
        payload = answer.encoded()
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass
        self.close_connection = True


@pytest.fixture
def fake_gemini() -> Iterable[FakeGemini]:
    """A started :class:`FakeGemini` with the default key (a fixture registered by tests/conftest.py)."""
    with FakeGemini() as server:
        yield server


# --- the oracle ----------------------------------------------------------------------------------

def _thumbnail(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=float)


def _png_b64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask, dtype=bool) * 255).astype(np.uint8), "L").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Oracle:
    """A responder that "sees" what tests drew, so end-to-end tests get meaningful boxes.

    Two sources, ground truth first:
    - :meth:`add` registers an image with its true boxes; an incoming image is matched by a 16x16
      thumbnail (survives the detector's downscale and JPEG re-encoding) and the aspect ratio.
    - ``colors`` maps a label to an RGB colour: solid rectangles of that colour on a plain
      background are found by colour distance and connected components.
    With ``only_requested`` (default) an object is reported only if its label occurs in the
    prompt or system instruction, like Gemini answering what was asked. ``mask_format`` "png"
    (Gemini 2.5) or "polygon" (newer models, ``[x, y]`` on 0-1000) adds masks when the prompt
    mentions masks.
    """

    def __init__(
        self,
        colors: Mapping[str, Sequence[int]] | None = None,
        *,
        tolerance: int = 40,
        min_area_fraction: float = 0.0002,
        mask_format: str | None = None,
        only_requested: bool = True,
        max_thumb_distance: float = 12.0,
    ) -> None:
        self.colors = {label: np.array(rgb[:3], dtype=float) for label, rgb in (colors or {}).items()}
        self.tolerance = tolerance
        self.min_area_fraction = min_area_fraction
        self.mask_format = mask_format
        self.only_requested = only_requested
        self.max_thumb_distance = max_thumb_distance
        self._truth: list[tuple[np.ndarray, float, list[tuple[list[int], str]]]] = []
        self._lock = threading.Lock()

    def add(self, image: Image.Image, objects: Sequence[tuple[Sequence[float], str]]) -> None:
        """Register ``image`` with its objects as ``(xyxy in image pixels, label)``."""
        w, h = image.size
        items = [(xyxy_to_gemini(xyxy, w, h), label) for xyxy, label in objects]
        with self._lock:
            self._truth.append((_thumbnail(image), w / h, items))

    def objects_for(self, image: Image.Image, text: str = "") -> list[dict]:
        """The answer items for ``image`` given the prompt ``text``."""
        wants_mask = self.mask_format is not None and "mask" in text.lower()
        items = self._from_truth(image, wants_mask)
        if items is None:
            items = self._from_colors(image, wants_mask)
        if self.only_requested:
            lowered = text.lower()
            items = [item for item in items if item["label"].lower() in lowered]
        return items

    def __call__(self, request: FakeRequest) -> Answer:
        if request.image is None:
            return bad_request("The request has no image.")
        return boxes(self.objects_for(request.image, request.all_text), model_version=request.model or DEFAULT_MODEL_VERSION)

    def _from_truth(self, image: Image.Image, wants_mask: bool) -> list[dict] | None:
        thumb, aspect = _thumbnail(image), image.width / image.height
        with self._lock:
            candidates = [
                (float(np.abs(t - thumb).mean()), items)
                for t, a, items in self._truth
                if abs(a - aspect) / aspect < 0.02
            ]
        if not candidates:
            return None
        distance, items = min(candidates, key=lambda c: c[0])
        if distance > self.max_thumb_distance:
            return None
        out = []
        for box_2d, label in items:
            item: dict[str, Any] = {"box_2d": list(box_2d), "label": label}
            if wants_mask:
                y0, x0, y1, x1 = box_2d
                if self.mask_format == "png":
                    item["mask"] = _png_b64(np.ones((8, 8), dtype=bool))
                else:
                    item["mask"] = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            out.append(item)
        return out

    def _from_colors(self, image: Image.Image, wants_mask: bool) -> list[dict]:
        rgb = np.asarray(image.convert("RGB"), dtype=float)
        h, w = rgb.shape[:2]
        min_area = max(4, int(self.min_area_fraction * w * h))
        out: list[dict] = []
        for label, color in self.colors.items():
            hit = (np.abs(rgb - color).max(axis=2) <= self.tolerance).astype(np.uint8)
            count, components, stats, _ = cv2.connectedComponentsWithStats(hit, connectivity=8)
            for i in range(1, count):
                x, y, bw, bh, area = (int(v) for v in stats[i])
                if area < min_area:
                    continue
                item: dict[str, Any] = {"box_2d": xyxy_to_gemini((x, y, x + bw, y + bh), w, h), "label": label}
                if wants_mask:
                    if self.mask_format == "png":
                        item["mask"] = _png_b64(components[y:y + bh, x:x + bw] == i)
                    else:  # solid rectangles: the outline is the box (no conversion outside geometry)
                        y0, x0, y1, x1 = item["box_2d"]
                        item["mask"] = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
                out.append(item)
        out.sort(key=lambda item: (item["box_2d"][0], item["box_2d"][1]))
        return out
