"""One Gemini detection request, built the same way for every tier: prompt, image bytes, config.

The synchronous call (client.py, standard or Flex) and the Batch API (batch.py) send exactly these,
so a batch answer means what a direct answer means and hits the same cache key.
"""

from __future__ import annotations

import io
import re
from typing import Any

from google.genai import types
from PIL import Image

from backend.core.geometry import scaled_size
from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings

# Bump when the prompt contract or parsing expectations change: old cached answers then miss.
RESPONSE_FORMAT_VERSION = 1
JPEG_QUALITY = 90
TIERS = ("standard", "flex", "batch")


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


def encode_image(image: Image.Image, max_side: int) -> bytes:
    """Downscaled JPEG: Gemini's 0-1000 grid is relative, so a kept aspect maps back exactly."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = scaled_size(image.width, image.height, max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def contents(jpeg: bytes, prompt: str) -> list:
    """The request's ``contents``: the image first, then the prompt (docs/gemini.md#prompt-recipe)."""
    return [types.Part.from_bytes(data=jpeg, mime_type="image/jpeg"), prompt]


def generation_config(settings: Settings, model: str, system: str, *, timeout: float | None = None,
                      tier: str = "standard") -> types.GenerateContentConfig:
    """The request's config. ``timeout`` (seconds) only for a synchronous call: a batch request has no HTTP
    options; ``tier`` "flex" sends ``serviceTier: flex`` (docs/gemini.md#batch-api-and-flex)."""
    s = settings
    return types.GenerateContentConfig(
        system_instruction=system,
        temperature=s.gemini_temperature,
        max_output_tokens=s.gemini_max_output_tokens,
        response_mime_type="application/json",
        thinking_config=types.ThinkingConfig(thinking_budget=0) if thinking_off_supported(model) else None,
        http_options=types.HttpOptions(timeout=max(1, int(timeout * 1000))) if timeout is not None else None,
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True) if timeout is not None else None,
        service_tier=types.ServiceTier.FLEX if tier == "flex" else None,
    )


def answer_params(settings: Settings, model: str, masks: bool) -> dict[str, Any]:
    """What, besides the prompt and image, changes the answer: part of the cache key."""
    s = settings
    return {
        "format": RESPONSE_FORMAT_VERSION, "max_image_side": s.gemini_max_image_side,
        "max_objects": s.gemini_max_objects, "temperature": s.gemini_temperature,
        "max_output_tokens": s.gemini_max_output_tokens, "thinking_off": thinking_off_supported(model),
        "masks": masks,
    }
