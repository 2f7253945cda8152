"""``lsb check``: one tiny Gemini call to prove the key and the model work.

    lsb check                       # GEMINI_MODEL with GEMINI_API_KEY
    lsb check --model gemini-2.5-flash-lite --image

Prints the model, the model version Gemini reports, the latency and the tokens (and their cost,
recorded in the same daily cost ledger as the service). Exit code 0 when it answered, 1 when the
call failed (bad key, unknown model, quota, network: the message says which), 2 when Gemini is
not configured. The key is never printed.
"""

from __future__ import annotations

import argparse
import io
import time

from google import genai
from google.genai import errors, types
from PIL import Image

from backend.detectors.gemini.client import thinking_off_supported
from backend.detectors.gemini.cost import CostTracker, Usage
from worker.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="verify the Gemini key and model with one tiny call",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model id (default GEMINI_MODEL)")
    p.add_argument("--image", action="store_true", help="send a tiny image too (checks image input; a few hundred tokens)")
    p.add_argument("--timeout", type=float, help="seconds (default GEMINI_TIMEOUT)")
    common.common_flags(p)
    p.set_defaults(run=run)


def _explain(exc: BaseException, model: str, endpoint: str) -> str:
    if isinstance(exc, errors.APIError):
        message = (exc.message or str(exc)).strip()
        status = exc.status or ""
        if exc.code == 400 and ("API key" in message or "API_KEY" in str(exc.details)):
            return f"the API key was rejected ({exc.code} {status}: {message}). Check GEMINI_API_KEY."
        if exc.code in (401, 403):
            return (f"not allowed ({exc.code} {status}: {message}). "
                    "Check the key and that the Generative Language API is enabled for it.")
        if exc.code == 404:
            return f"model {model!r} was not found ({exc.code} {status}: {message}). Check GEMINI_MODEL / --model."
        if exc.code == 429:
            return f"quota or rate limit reached ({exc.code} {status}: {message})."
        return f"Gemini answered {exc.code} {status}: {message}"
    name = type(exc).__name__
    if "Timeout" in name:
        return f"no answer from {endpoint} in time ({name}). Check the network or GEMINI_TIMEOUT."
    if "Connect" in name or "Transport" in name or isinstance(exc, OSError):
        return f"cannot reach {endpoint} ({name}: {exc})."
    return f"{name}: {exc}"


def run(args: argparse.Namespace) -> int:
    s = common.settings()
    model = args.model or s.gemini_model
    if not s.gemini_enabled:
        raise common.CLIError("Gemini is not configured: "
                              "set GEMINI_API_KEY (or GOOGLE_API_KEY, or GOOGLE_GENAI_USE_VERTEXAI=true)")
    key = s.gemini_api_key.get_secret_value().strip()
    endpoint = s.gemini_base_url or ("Vertex AI" if s.google_genai_use_vertexai else "https://generativelanguage.googleapis.com")
    timeout = args.timeout or s.gemini_timeout
    http_options = types.HttpOptions(base_url=s.gemini_base_url or None, api_version=s.gemini_api_version or None,
                                     timeout=int(timeout * 1000))
    contents: list = ["Reply with the single word OK."]
    if args.image:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG")
        contents = [types.Part.from_bytes(data=buf.getvalue(), mime_type="image/jpeg"), "What colour is this image? One word."]
    config = types.GenerateContentConfig(
        temperature=0.0, max_output_tokens=16,
        thinking_config=types.ThinkingConfig(thinking_budget=0) if thinking_off_supported(model) else None,
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    started = time.perf_counter()
    try:
        client = (genai.Client(vertexai=True, api_key=key or None, http_options=http_options) if s.google_genai_use_vertexai
                  else genai.Client(vertexai=False, api_key=key, http_options=http_options))
        try:
            response = client.models.generate_content(model=model, contents=contents, config=config)
        finally:
            client.close()
    except Exception as exc:
        message = _explain(exc, model, endpoint)
        if key:
            message = message.replace(key, "***")
        raise common.CLIError(f"Gemini check failed for model {model}: {message}", code=1) from None
    latency = time.perf_counter() - started
    usage = Usage.from_metadata(response.usage_metadata)
    cost = CostTracker(s, common.redis_or_none(s, timeout=1.0)).record(model, usage)
    text = (response.text or "").strip() if response.candidates else ""
    common.print_json({
        "ok": True, "model": model, "model_version": response.model_version, "endpoint": endpoint,
        "latency_s": round(latency, 3), "tokens": {**usage.to_dict(), "total": usage.total},
        "cost_usd": round(cost, 8), "answer": text[:80],
    })
    return 0
