"""What the ``lsb`` commands share: label configs, drafting sources, image lists, a thread pool."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis as redis_lib
from tqdm import tqdm

from backend.core import label_config
from backend.core.connection import connect
from backend.core.detections import Detections
from backend.core.images import ImageError, ImageLoader, LoadedImage, decode_image
from backend.core.label_config import ProjectConfig, UnsupportedConfig
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings, get_settings
from backend.core.ultralytics_env import EXPORT_FORMATS
from backend.detectors.gemini.client import GeminiDetector, GeminiUnavailable
from backend.detectors.owlvit import ModelNotAvailable, OwlVitDetector, OwlVitOptions
from backend.detectors.yolo import YoloDetector
from backend.serving.services import bulk_sync_tier

log = logging.getLogger("lsb")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
SOURCES = ("gemini", "yolo", "owlvit")


class CLIError(Exception):
    """A problem the user can fix; the message is printed without a traceback (exit code ``code``)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def settings() -> Settings:
    get_settings.cache_clear()  # the environment may have changed since (tests, --env)
    return get_settings()


def redis_or_none(s: Settings, timeout: float = 2.0):
    """A Redis client when Redis answers, else None (the cache and cost ledger are then off)."""
    client = connect(s.redis_url, timeout)
    try:
        client.ping()
        return client
    except redis_lib.RedisError as exc:
        log.warning("Redis at %s is not answering (%s): no answer cache, no shared cost ledger", s.redis_url, type(exc).__name__)
        return None


# --- label configs ------------------------------------------------------------------------------

def config_from_labels(labels: str | Sequence[str], tag: str = "rectangle") -> str:
    """:func:`backend.core.label_config.config_from_labels`, its errors as :class:`CLIError`."""
    try:
        return label_config.config_from_labels(labels, tag)
    except UnsupportedConfig as exc:
        raise CLIError(str(exc)) from None


def load_config(args: argparse.Namespace, fallback_labels: Sequence[str] | None = None) -> tuple[ProjectConfig, str]:
    """``(ProjectConfig, xml)`` from ``--label-config`` or ``--labels`` (or ``fallback_labels``)."""
    xml = ""
    if getattr(args, "label_config", None):
        path = Path(args.label_config)
        if not path.is_file():
            raise CLIError(f"label config {path} does not exist")
        xml = path.read_text()
    elif getattr(args, "labels", None):
        xml = config_from_labels(args.labels, getattr(args, "tag", "rectangle") or "rectangle")
    elif fallback_labels:
        xml = config_from_labels(list(fallback_labels), getattr(args, "tag", "rectangle") or "rectangle")
    else:
        raise CLIError("give the labels: --label-config label_config.xml or --labels \"helmet,person without helmet\"")
    try:
        return ProjectConfig.parse(xml), xml
    except UnsupportedConfig as exc:
        raise CLIError(f"unusable label config: {exc}") from None


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("labels (one of)")
    group.add_argument("--label-config", metavar="XML", help="Label Studio label config file (labels, hints, predicted_values)")
    group.add_argument("--labels", metavar="LIST",
                       help='comma-separated labels, "value" or "value=hint": "helmet,person without helmet"')
    group.add_argument("--tag", choices=sorted(label_config.TAG_SHORT_NAMES), default="rectangle",
                       help="control tag for --labels: rectangle (boxes), polygon or brush (masks); default rectangle")


# --- images -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageItem:
    """One input image: a local ``path`` or a ``url``; ``name`` is its path relative to the input root."""

    name: str
    path: Path | None = None
    url: str | None = None

    @property
    def ref(self) -> dict:
        return {"name": self.name, "path": str(self.path) if self.path else None, "url": self.url}


def _is_url(text: str) -> bool:
    return urlsplit(text).scheme.lower() in ("http", "https", "gs", "s3", "azure-blob", "data")


def list_images(inputs: Sequence[str]) -> list[ImageItem]:
    """Folders (recursive), image files, text files listing paths/URLs (``@list.txt``), or URLs."""
    entries: list[str] = []
    for raw in inputs:
        if raw.startswith("@"):
            listing = Path(raw[1:])
            if not listing.is_file():
                raise CLIError(f"list file {listing} does not exist")
            entries.extend(line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#"))
        else:
            entries.append(raw)
    items: list[ImageItem] = []
    files: list[Path] = []
    for entry in entries:
        if _is_url(entry):
            tail = Path(urlsplit(entry).path).name or "image"
            items.append(ImageItem(f"url-{hashlib.sha256(entry.encode()).hexdigest()[:8]}-{tail}", url=entry))
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            root = path.resolve()
            for f in sorted(p for p in root.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(".annotated.png")):
                items.append(ImageItem(f.relative_to(root).as_posix(), path=f))
        elif path.is_file():
            files.append(path.resolve())
        else:
            raise CLIError(f"{entry} is not a file, folder or URL")
    if files:
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        items.extend(ImageItem(f.relative_to(root).as_posix(), path=f) for f in files)
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise CLIError("two inputs map to the same output name; pass one folder instead of files from several")
    if not items:
        raise CLIError("no images found in the inputs")
    return items


class Images:
    """Loads :class:`ImageItem` s: local files directly, URLs through the backend's ImageLoader."""

    def __init__(self, s: Settings):
        self.settings = s
        self._loader = None
        self._lock = threading.Lock()

    def load(self, item: ImageItem) -> LoadedImage:
        if item.path is not None:
            try:
                data = item.path.read_bytes()
            except OSError as exc:
                raise ImageError("not_found", f"{item.path}: {exc.strerror}") from None
            image = decode_image(data, max_pixels=self.settings.image_max_pixels)
            return LoadedImage(image, image.width, image.height, hashlib.sha256(data).hexdigest(), data)
        with self._lock:
            if self._loader is None:
                self._loader = ImageLoader(self.settings)
        return self._loader.load(item.url or "")

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


# --- drafting sources ---------------------------------------------------------------------------

class SourceError(Exception):
    """One image could not be drafted (the run goes on; the image is retried on the next run)."""


@dataclass
class Source:
    """A drafting source behind one call: ``detect(image, config, query) -> Detections``."""

    name: str
    model: str
    workers: int
    _detect: Callable[[LoadedImage, ProjectConfig, str | None], Detections]
    _close: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)

    def detect(self, image: LoadedImage, config: ProjectConfig, query: str | None = None) -> Detections:
        return self._detect(image, config, query)

    def close(self) -> None:
        self._close()


def add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("drafting source")
    group.add_argument("--source", choices=SOURCES, required=required,
                       help="gemini (GEMINI_API_KEY), yolo (a checkpoint) or owlvit (local OWL-ViT/OWLv2)")
    group.add_argument("--model", help="yolo: a .pt path; owlvit: a folder or cached hub id (default OWLVIT_MODEL); "
                                       "gemini: a model id (default GEMINI_MODEL)")
    group.add_argument("--project", help="yolo: use this Label Studio project's registry model (current, or --version)")
    group.add_argument("--version", help="yolo: registry version (with --project), e.g. v0003")
    group.add_argument("--threshold", type=float,
                       help="minimum score (yolo default: the config's model_score_threshold or YOLO_SCORE_THRESHOLD; "
                            "owlvit: OWLVIT_THRESHOLD)")
    group.add_argument("--sam-model", help="owlvit: SAM folder or cached hub id for masks (default SAM_MODEL)")
    group.add_argument("--no-cache", action="store_true", help="gemini: do not read or write the Redis answer cache")


def make_source(args: argparse.Namespace, s: Settings, config: ProjectConfig) -> Source:
    name = args.source
    if name == "gemini":
        return _gemini_source(args, s)
    if name == "yolo":
        return _yolo_source(args, s, config)
    if name == "owlvit":
        return _owlvit_source(args)
    raise CLIError(f"unknown source {name!r}")


def _gemini_source(args, s: Settings) -> Source:
    if args.model:
        s = s.model_copy(update={"gemini_model": args.model})
    if not s.gemini_enabled:
        raise CLIError("Gemini is not configured: set GEMINI_API_KEY (or GOOGLE_API_KEY), or use --source owlvit/yolo")
    redis = None if getattr(args, "no_cache", False) else redis_or_none(s)
    detector = GeminiDetector(s, redis, tier=bulk_sync_tier(s))  # bulk work: GEMINI_BULK_TIER's synchronous tier

    def detect(image: LoadedImage, config: ProjectConfig, query: str | None) -> Detections:
        try:
            return detector.detect(image.image, image.sha256, config, query)
        except GeminiUnavailable as exc:
            raise SourceError(f"gemini {exc.reason}: {exc.message}") from None

    return Source("gemini", detector.model, s.gemini_concurrency, detect, detector.close, {"cost": detector.cost})


def resolve_yolo(args, s: Settings) -> tuple[Path, str, dict[str, Path]]:
    """(checkpoint, version, verified exports) from --model, --project/--version, or YOLO_MODEL."""
    if args.model:
        path = Path(args.model)
        if not path.is_file():
            raise CLIError(f"YOLO checkpoint {path} does not exist (a missing .pt is never downloaded)")
        return path, path.stem, {}
    if getattr(args, "project", None):
        registry = ModelRegistry(s.model_dir, redis_or_none(s))
        info = registry.get(args.project, args.version) if args.version else registry.current(args.project)
        if info is None:
            raise CLIError(f"project {args.project} has no "
                           f"{'version ' + args.version if args.version else 'current model'} in {s.model_dir}")
        exports = {fmt: path for fmt in EXPORT_FORMATS if (path := info.export(fmt)) is not None}
        return info.checkpoint, info.version, exports
    if s.yolo_model:
        path = Path(s.yolo_model)
        if path.is_file():
            return path, path.stem, {}
        raise CLIError(f"YOLO_MODEL={s.yolo_model} does not exist")
    raise CLIError("--source yolo needs --model model.pt, --project P [--version V] or YOLO_MODEL")


def _yolo_source(args, s: Settings, config: ProjectConfig) -> Source:
    path, version, exports = resolve_yolo(args, s)
    # The served model: a verified ONNX/OpenVINO export when the version has one.
    detector = YoloDetector.load(path, version, exports, device=s.yolo_device, imgsz=s.yolo_imgsz, threads=s.yolo_threads)
    threshold = args.threshold if args.threshold is not None else config.score_threshold(s.yolo_score_threshold)

    def detect(image: LoadedImage, config: ProjectConfig, query: str | None) -> Detections:
        return detector.detect_batch([image.image], config, threshold)[0]

    return Source("yolo", detector.model_name, 1, detect,
                  info={"checkpoint": str(getattr(detector, "path", path)), "threshold": threshold})


def _owlvit_source(args) -> Source:
    try:
        options = OwlVitOptions.from_env(model=args.model or None, sam_model=getattr(args, "sam_model", None),
                                         threshold=args.threshold)
        detector = OwlVitDetector(options)
    except ModelNotAvailable as exc:
        raise CLIError(str(exc)) from None

    def detect(image: LoadedImage, config: ProjectConfig, query: str | None) -> Detections:
        return detector.detect(image.image, image.sha256, config, query)

    return Source("owlvit", detector.model_name, 1, detect, info={"threshold": detector.options.threshold})


# --- running ------------------------------------------------------------------------------------

def parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str,
             quiet: bool = False) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """``(item, result, error)`` as they finish, with a tqdm bar on stderr."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=quiet or not items, file=sys.stderr, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lsb") as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    yield item, future.result(), None
                except Exception as exc:  # noqa: BLE001 - one image's failure never stops the run
                    yield item, None, exc
                bar.update(1)
    finally:
        bar.close()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")

