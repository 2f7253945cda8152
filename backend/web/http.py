"""HTTP plumbing shared by every blueprint: body limits, JSON parsing, input checks and error answers.

Every error is a JSON object ``{error, message}``: a malformed input is a 400, an HTTP error keeps
its code, Redis down is a 503 (the caller may retry) and anything else a 500 without details.
"""

from __future__ import annotations

import logging
from typing import Any

import redis as redis_lib
from flask import Flask, Request, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.core.keys import project_key
from backend.core.label_config import UnsupportedConfig
from backend.web.webhook import BadEvent

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """Malformed input: answered 400 with the message."""


#: Upper bounds of what json.loads allocates (CPython 3.11, measured with tracemalloc on the worst shapes:
#: ``[{},{}...]`` costs 75 B per container, ``[{"a":0},...]`` 200 B per element, unique keys with float values 88 B per
#: separator, strings about their length): bytes per ``{``/``[``, per ``,``/``:``, per body byte.
JSON_COST_PER_CONTAINER = 200
JSON_COST_PER_SEPARATOR = 100
#: The parsed body may cost at most this many times MAX_REQUEST_MB (256 MB at the default 32).
JSON_EXPANSION_LIMIT = 8


def json_cost_bytes(raw: bytes | str) -> int:
    """An upper bound of the memory ``json.loads(raw)`` takes, counted before parsing (C-speed counts).

    Separators and brackets inside strings are counted too, which only overestimates. No JSON library
    kept here offers a budget on the parsed size, hence this tally.
    """
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    containers = data.count(b"{") + data.count(b"[")
    separators = data.count(b",") + data.count(b":")
    return JSON_COST_PER_CONTAINER * containers + JSON_COST_PER_SEPARATOR * separators + len(data)


class JSONTooComplex(RequestEntityTooLarge):
    description = ("the JSON body would take more memory to parse than this service allows per request "
                   f"({JSON_EXPANSION_LIMIT}x MAX_REQUEST_MB); send fewer tasks per request")


class SafeJSONProvider(DefaultJSONProvider):
    """A JSON parser that refuses bodies whose parsed form would be huge, and deep nesting.

    A 32 MB body of ``[{},{},...]`` becomes 800 MB of Python objects, so the body's cost is
    bounded *before* parsing (a 413). Deeply nested JSON (``[[[[...]]]]``) makes the parser raise
    RecursionError, which Flask does not treat as a parse error: it becomes a 400 like any other bad body.
    """

    def loads(self, s, **kwargs):
        limit = self._app.config.get("MAX_CONTENT_LENGTH")
        if limit and len(s) * (JSON_COST_PER_CONTAINER + 1) > JSON_EXPANSION_LIMIT * limit and (
                json_cost_bytes(s) > JSON_EXPANSION_LIMIT * limit):
            raise JSONTooComplex()
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


class LimitedRequest(Request):
    """werkzeug cuts a chunked body (no Content-Length) at MAX_CONTENT_LENGTH without an error (only a
    second read raises), so an oversized upload would surface as "not JSON": make it the 413 it is."""

    def get_data(self, *args, **kwargs):
        data = super().get_data(*args, **kwargs)
        limit = self.max_content_length
        if self.content_length is None and limit is not None and isinstance(data, (bytes, str)) and len(data) >= limit:
            raise RequestEntityTooLarge()
        return data


def json_body() -> dict:
    """The request body as a JSON object, or :class:`BadRequest`."""
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def body_project() -> Any:
    """``project`` from a JSON object body, if the body is one (training and model routes)."""
    body = request.get_json(silent=True)
    return body.get("project") if isinstance(body, dict) else None


def project_arg(value: Any) -> str:
    """A Label Studio project id as the registry keys it, or :class:`BadRequest`."""
    try:
        return project_key(value)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"'project' is required and must be a Label Studio project id: {exc}") from exc


def _bad_request(exc: Exception):
    return jsonify(error="bad_request", message=str(exc)), 400


def _http_error(exc: HTTPException):
    return jsonify(error=exc.name.lower().replace(" ", "_"), message=exc.description), exc.code


def _redis_down(exc: redis_lib.RedisError):
    log.error("redis unavailable: %s", type(exc).__name__)
    return jsonify(error="unavailable", message="queue (Redis) unavailable, try again"), 503


def _unexpected(exc: Exception):
    log.exception("unhandled error on %s", request.path)
    return jsonify(error="internal_error", message=f"{type(exc).__name__}: see the backend log"), 500


def install(app: Flask, max_request_mb: int) -> None:
    """Request class, JSON provider, body limit and JSON error handlers on ``app``."""
    app.request_class = LimitedRequest
    app.json = SafeJSONProvider(app)
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = max_request_mb * 1024 * 1024
    for bad_input in (BadRequest, BadEvent, UnsupportedConfig):
        app.register_error_handler(bad_input, _bad_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(redis_lib.RedisError, _redis_down)
    app.register_error_handler(Exception, _unexpected)
