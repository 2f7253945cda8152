"""Keeps each process's YOLO models current without a restart.

A background thread listens on the registry's pub/sub channel (the fast path) and re-reads the
current version of every project this process serves every ``HOTSWAP_POLL_SECONDS`` (covers lost
messages, Redis restarts, and hosts that share only ``MODEL_DIR``); each poll also repairs Redis's copy
of the current version from the disk pointer (:meth:`ModelRegistry.reconcile`). A new version is loaded and
warmed up in that thread while the old model keeps serving; the swap is one reference assignment,
so no request ever waits for or fails on a load.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import redis as redis_lib

from backend.core.connection import connect
from backend.core.keys import Keys, project_key
from backend.core.metrics import HOTSWAPS
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.detectors.yolo import EXPORT_FORMATS, YoloDetector

log = logging.getLogger(__name__)

_HOLDERS: weakref.WeakSet[ModelHolder] = weakref.WeakSet()


@atexit.register
def _stop_watchers() -> None:
    """Stop every watcher before the interpreter finalizes. A daemon thread still inside torch then
    (warming a model up, dropping the old one) is killed mid-C++ and aborts the whole process with
    "terminate called without an active exception" (seen in the test suite). Gunicorn workers skip
    this: they leave with os._exit (gunicorn.conf.py)."""
    holders = list(_HOLDERS)
    for holder in holders:
        holder.stop()
    for holder in holders:
        holder.join(timeout=10.0)


class ModelHolder:
    """The YOLO detector each project is served by, in this process."""

    def __init__(self, settings: Settings, registry: ModelRegistry, redis_url: str | None = None):
        self.settings = settings
        self.registry = registry
        self._redis_url = redis_url or settings.redis_url
        # Per-project state, bounded: at most MODEL_CACHE_SIZE projects (least recently asked dropped
        # first), so /setup or /predict for ever new project ids cannot grow the process.
        self.max_models = max(1, int(settings.model_cache_size))
        self._models: dict[str, YoloDetector] = {}
        self._failed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._load_locks: OrderedDict[str, threading.Lock] = OrderedDict()  # the projects served, oldest first
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._fixed: YoloDetector | None = None
        self._by_path: OrderedDict[Path, YoloDetector] = OrderedDict()  # model_path checkpoints, LRU
        if settings.yolo_model:
            path = Path(settings.yolo_model)
            self._fixed = self._load(path, f"custom-{path.stem}")

    # --- serving side (never blocks on a swap) ---------------------------------------------------

    def get(self, project: str | int) -> YoloDetector | None:
        """The model serving ``project`` now; the first call for a project loads it once."""
        if self._fixed is not None:
            return self._fixed
        key = project_key(project)
        with self._lock:
            self._touch(key)
            model = self._models.get(key)
        if model is None:
            self._ensure_started()
            model = self._sync(key)
        return model

    def resolve_model_path(self, raw: str) -> Path:
        """A label config's ``model_path``: only checkpoints inside MODEL_DIR may be named there.

        Loading a checkpoint unpickles it, so a path from the label config must never reach an
        arbitrary file on this host.
        """
        root = Path(self.settings.model_dir).resolve()
        path = (root / raw).resolve()
        if not path.is_relative_to(root) or path.suffix != ".pt" or not path.is_file():
            raise FileNotFoundError(f"model_path {raw!r} is not a .pt checkpoint inside MODEL_DIR")
        return path

    @staticmethod
    def path_version(path: Path) -> str:
        return f"path-{path.parent.name}-{path.stem}" if path.parent.name else f"path-{path.stem}"

    def for_path(self, raw: str) -> YoloDetector:
        """The detector for a label config's ``model_path`` (loaded once per process)."""
        path = self.resolve_model_path(raw)
        with self._lock:
            model = self._by_path.get(path)
            if model is not None:
                self._by_path.move_to_end(path)
        if model is None:
            model = self._load(path, self.path_version(path))
            with self._lock:
                self._by_path[path] = model
                while len(self._by_path) > self.max_models:
                    self._by_path.popitem(last=False)
        return model

    def version(self, project: str | int) -> str | None:
        """The version ``get`` serves now, without loading anything (for /setup and /health)."""
        if self._fixed is not None:
            return self._fixed.version
        key = project_key(project)
        with self._lock:
            self._touch(key)
            model = self._models.get(key)
        if model is not None:
            return model.version
        self._ensure_started()
        self._wake.set()  # load it in the background so the coming /predict finds it ready
        version = self.registry.current_version(key)
        return version if version and self.registry.get(key, version) else None

    def loaded(self) -> dict[str, str]:
        return {p: m.version for p, m in list(self._models.items())}

    def _touch(self, project: str) -> threading.Lock:
        """Mark ``project`` as just asked for (the caller holds ``_lock``); returns its load lock.

        Beyond ``max_models`` projects the least recently asked one is forgotten: its model, its
        failed versions and its watch entry. The next request for it loads it again.
        """
        lock = self._load_locks.get(project)
        if lock is None:
            lock = self._load_locks[project] = threading.Lock()
        else:
            self._load_locks.move_to_end(project)
        while len(self._load_locks) > self.max_models:
            old, _ = self._load_locks.popitem(last=False)
            dropped = self._models.pop(old, None)
            self._failed = {f for f in self._failed if f[0] != old}
            if dropped is not None:
                log.info("project %s: YOLO %s unloaded (MODEL_CACHE_SIZE=%d)", old, dropped.version, self.max_models)
        return lock

    # --- loading -----------------------------------------------------------------------------------

    def _load(self, path: Path, version: str) -> YoloDetector:
        """The version's fastest verified export (OpenVINO > ONNX) when it has one, else the .pt; warmed up."""
        exports: dict[str, Path] = {}
        try:  # a registry version lives at MODEL_DIR/<project>/<version>/model.pt; YOLO_MODEL is any path
            info = self.registry.get(path.parent.parent.name, version)
        except ValueError:
            info = None
        if info is not None and info.checkpoint.resolve() == Path(path).resolve():
            exports = {fmt: p for fmt in EXPORT_FORMATS if (p := info.export(fmt)) is not None}
        return YoloDetector.load(path, version, exports, self.settings.yolo_device, self.settings.yolo_imgsz,
                                 self.settings.yolo_threads)

    def _sync(self, project: str, watching: bool = False) -> YoloDetector | None:
        """Load the registry's current version for ``project`` if this process has another.

        The watcher (``watching``) leaves alone a project evicted meanwhile; a request brings it back.
        """
        with self._lock:
            load_lock = self._load_locks.get(project) if watching else self._touch(project)
        if load_lock is None:
            return None
        with load_lock:
            info = self.registry.current(project)
            current = self._models.get(project)
            if info is None:
                if current is not None:  # the project lost its current version (deleted and cleaned up)
                    with self._lock:
                        self._models.pop(project, None)
                    HOTSWAPS.labels("unloaded").inc()
                    log.info("project %s has no current version any more: stopped serving YOLO %s", project,
                             current.version)
                return None
            if current is not None and current.version == info.version:
                return current
            if (project, info.version) in self._failed:
                return current
            started = time.perf_counter()
            try:
                model = self._load(info.checkpoint, info.version)
            except Exception:
                log.exception("could not load project %s version %s; keeping %s", project, info.version,
                              current and current.version)
                self._failed.add((project, info.version))
                HOTSWAPS.labels("failed").inc()
                return current
            with self._lock:
                if project not in self._load_locks:  # evicted while loading: do not keep it
                    return model
                self._models[project] = model  # the swap: one reference assignment
            HOTSWAPS.labels("loaded").inc()
            log.info("project %s now serves YOLO %s (loaded in %.2fs, was %s)", project, info.version,
                     time.perf_counter() - started, current and current.version)
            return model

    # --- background watcher ----------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._watch, name="model-hotswap", daemon=True)
                    self._listener = threading.Thread(target=_listen, name="model-pubsub", daemon=True,
                                                      args=(self._redis_url, self._stop, self._wake, self._load_locks))
                    _HOLDERS.add(self)
                    self._thread.start()
                    self._listener.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the watcher threads to end after :meth:`stop` (a model being loaded finishes first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._thread, self._listener):
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _watch(self) -> None:
        while not self._stop.is_set():
            for project in list(self._load_locks):
                try:
                    self.registry.reconcile(project)  # disk pointer vs Redis copy: the disk wins
                    self._sync(project, watching=True)
                except Exception:
                    log.exception("hot-swap check failed for project %s", project)
            self._wake.wait(self.settings.hotswap_poll_seconds)
            self._wake.clear()


def _listen(redis_url: str, stop: threading.Event, wake: threading.Event, projects: dict) -> None:
    """Wake the watcher on every promotion notice for one of ``projects``; reconnect forever with backoff.

    A plain function, not a method: this daemon thread must hold no reference to the holder, or at
    interpreter exit it could be the one to drop the last one and free torch models mid-finalization.
    """
    delay = 0.5
    while not stop.is_set():
        try:
            # no read timeout: the subscriber waits for messages as long as it takes
            client = connect(redis_url, None, connect_timeout=2, health_check_interval=10)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(Keys.MODELS_CHANNEL)
            delay = 0.5
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    try:
                        project = json.loads(message["data"]).get("project")
                    except (ValueError, TypeError):
                        continue
                    if project in projects:
                        wake.set()
        except redis_lib.RedisError:
            time.sleep(delay)
            delay = min(delay * 2, 10)
