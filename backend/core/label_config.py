"""What a Label Studio label config asks of this backend, parsed once with label-studio-sdk.

Attributes honoured (the first three as in Label Studio's official YOLO backend):
- ``predicted_values="car,truck"`` on ``<Label>``: model class names that map to this label.
- ``model_score_threshold="0.4"`` on the control tag: minimum score of a region.
- ``model_skip="true"`` on the control tag: this backend leaves the control alone.
- ``hint="construction worker not wearing a helmet"`` on ``<Label>``: the natural-language
  description sent to Gemini, so attribute queries ("without a helmet") work.
A ``<TextArea>`` on the same image carries interactive prompts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from label_studio_sdk.label_interface import LabelInterface

SUPPORTED_CONTROLS = ("RectangleLabels", "BrushLabels", "PolygonLabels")
MASK_CONTROLS = ("BrushLabels", "PolygonLabels")
# Short names for configs built from a label list (``lsb --tag``): "RectangleLabels" -> "rectangle".
TAG_SHORT_NAMES = {tag.removesuffix("Labels").lower(): tag for tag in SUPPORTED_CONTROLS}


CONFIG_CACHE_SIZE = 64  # parsed label configs kept per process, least recently used dropped first
MAX_CACHED_CONFIG_CHARS = 64 * 1024  # real configs are a few KB; a larger one is parsed every time, never kept


class UnsupportedConfig(ValueError):
    """The config has nothing this backend can predict; the message is shown to the user."""


@dataclass(frozen=True)
class LabelSpec:
    value: str
    predicted_values: tuple[str, ...] = ()
    hint: str = ""

    @property
    def description(self) -> str:
        """What Gemini is asked to find for this label."""
        return self.hint or self.value


@dataclass(frozen=True)
class ControlSpec:
    name: str
    tag: str
    to_name: str
    labels: tuple[LabelSpec, ...]
    score_threshold: float | None = None
    model_path: str = ""

    @property
    def label_values(self) -> tuple[str, ...]:
        return tuple(label.value for label in self.labels)


def _norm(text: str) -> str:
    text = re.sub(r"[\s_\-]+", " ", text.strip().lower())
    return text[:-1] if text.endswith("s") and len(text) > 3 else text


@dataclass(frozen=True)
class ProjectConfig:
    """The supported controls of one label config, all on one Image object."""

    controls: tuple[ControlSpec, ...]
    image_name: str
    image_key: str
    prompt_control: str = ""

    @classmethod
    def parse(cls, xml: str) -> ProjectConfig:
        """Parse a label config; raise :class:`UnsupportedConfig` naming what is supported.

        Every /predict carries its config, so parses are cached: at most ``CONFIG_CACHE_SIZE`` configs
        of at most ``MAX_CACHED_CONFIG_CHARS`` each (a larger one is parsed again on every call).
        """
        if isinstance(xml, str) and len(xml) > MAX_CACHED_CONFIG_CHARS:
            return _parse(xml)
        return _parse_cached(xml)

    @property
    def labels(self) -> tuple[LabelSpec, ...]:
        """Unique labels in label-config order: the YOLO class list."""
        seen: dict[str, LabelSpec] = {}
        for control in self.controls:
            for label in control.labels:
                seen.setdefault(label.value, label)
        return tuple(seen.values())

    @property
    def class_names(self) -> list[str]:
        return [label.value for label in self.labels]

    @property
    def wants_masks(self) -> bool:
        return any(c.tag in MASK_CONTROLS for c in self.controls)

    def match_label(self, raw: str) -> str | None:
        """Map a detector's class name to a config label: exact, predicted_values, hint, then loose case/plural."""
        raw = str(raw).strip()
        for label in self.labels:
            if raw == label.value:
                return label.value
        lowered = raw.lower()
        for label in self.labels:
            if lowered == label.value.lower() or lowered in (p.lower() for p in label.predicted_values):
                return label.value
            if label.hint and lowered == label.hint.lower():
                return label.value
        loose = _norm(raw)
        for label in self.labels:
            candidates = (label.value, *label.predicted_values, label.hint)
            if any(c and _norm(c) == loose for c in candidates):
                return label.value
        return None

    def score_threshold(self, default: float) -> float:
        """The lowest threshold any control asks for (each control filters again on its own)."""
        values = [c.score_threshold for c in self.controls if c.score_threshold is not None]
        return min(values) if values else default


def config_from_labels(labels: str | Sequence[str], tag: str = "rectangle") -> str:
    """A label config XML with one control of ``tag`` (a short name) on one Image, for a label list.

    A string is ``"helmet,person without helmet"`` where ``value=hint`` gives a hint; a sequence
    holds exact label values (class names may contain commas or '='). Raises
    :class:`UnsupportedConfig` for an empty list or an unknown tag.
    """
    if isinstance(labels, str):
        pairs = [tuple(p.strip() for p in item.partition("=")[::2]) for item in labels.split(",") if item.strip()]
    else:
        pairs = [(str(v).strip(), "") for v in labels if str(v).strip()]
    if not pairs:
        raise UnsupportedConfig("--labels is empty")
    control = TAG_SHORT_NAMES.get(tag)
    if control is None:
        raise UnsupportedConfig(f"--tag must be one of {', '.join(TAG_SHORT_NAMES)}")
    parts = []
    for value, hint in dict.fromkeys(pairs):
        attrs = f"value={quoteattr(value)}" + (f" hint={quoteattr(hint)}" if hint else "")
        parts.append(f"<Label {attrs}/>")
    return f'<View><Image name="image" value="$image"/><{control} name="label" toName="image">{"".join(parts)}</{control}></View>'


def _parse(xml: str) -> ProjectConfig:
    if not xml or not xml.strip():
        raise UnsupportedConfig("empty label config")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several types for bad XML
        raise UnsupportedConfig(f"label config is not valid XML: {exc}") from exc

    images = {obj.name: obj for obj in interface.objects if obj.tag == "Image"}
    found: list[str] = []
    controls: list[ControlSpec] = []
    prompt_control = ""
    for control in interface.controls:
        found.append(control.tag)
        target = (control.to_name or [""])[0]
        if control.tag == "TextArea" and target in images and not prompt_control:
            prompt_control = control.name
            continue
        if control.tag not in SUPPORTED_CONTROLS or target not in images:
            continue
        if str(control.attr.get("model_skip", "")).lower() in ("true", "1", "yes"):
            continue
        labels = tuple(
            LabelSpec(
                value=value,
                predicted_values=tuple(
                    p.strip() for p in str(tag.attr.get("predicted_values", "")).split(",") if p.strip()
                ),
                hint=str(tag.attr.get("hint", "")).strip(),
            )
            for value, tag in control.labels_attrs.items()
        )
        threshold = control.attr.get("model_score_threshold")
        try:
            score_threshold = float(threshold) if threshold not in (None, "") else None
        except ValueError as exc:
            raise UnsupportedConfig(f"model_score_threshold on {control.name} is not a number: {threshold!r}") from exc
        controls.append(ControlSpec(control.name, control.tag, target, labels, score_threshold,
                                    str(control.attr.get("model_path", ""))))

    if not controls:
        raise UnsupportedConfig(
            "this ML backend predicts RectangleLabels, BrushLabels or PolygonLabels on an <Image>; "
            f"the label config has {', '.join(found) or 'no control tags'}"
            + ("" if images else " and no <Image> object")
        )
    image_name = controls[0].to_name
    controls = [c for c in controls if c.to_name == image_name]
    image_key = images[image_name].value.lstrip("$")
    return ProjectConfig(tuple(controls), image_name, image_key, prompt_control)


# Bounded by count and by entry size, so request data cannot grow a process: 64 configs of 64 KB.
_parse_cached = functools.lru_cache(maxsize=CONFIG_CACHE_SIZE)(_parse)
