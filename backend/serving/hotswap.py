"""Keeps each process's YOLO models current without a restart.

A background thread listens on the registry's pub/sub channel (the fast path) and re-reads the
current version of every project this process serves every ``HOTSWAP_POLL_SECONDS`` (covers lost
messages, Redis restarts, and hosts that share only ``MODEL_DIR``); each poll also repairs Redis's copy
of the current version from the disk pointer (:meth:`ModelRegistry.reconcile`). A new version is loaded and
warmed up in that thread while the old model keeps serving; the swap is one reference assignment,
so no request ever waits for or fails on a load.

Preloading: before a training promotes, it announces the candidate version on
``lsb:models:candidates`` (:meth:`ModelRegistry.preload`). Every process that serves the project loads
and warms it beside the current model (at most one candidate per project) and acknowledges it; the
training waits for those acknowledgements (``MODEL_PRELOAD_TIMEOUT``), then moves the pointer, and the
swap finds the model already loaded. A candidate that is not promoted within
``MODEL_PRELOAD_TIMEOUT`` + ``CANDIDATE_GRACE_S`` (a crash, a lost compare-and-swap) is dropped.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import redis as redis_lib

from backend.core.connection import connect
from backend.core.keys import Keys, project_key
from backend.core.metrics import HOTSWAPS
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.detectors.yolo import YoloDetector, serving_formats

log = logging.getLogger(__name__)

CANDIDATE_GRACE_S = 60.0  # how long past MODEL_PRELOAD_TIMEOUT an unpromoted candidate stays loaded

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
        # Preloaded candidates, at most one per served project: project -> (model, loaded at, monotonic)
        self._candidates: dict[str, tuple[YoloDetector, float]] = {}
        self._candidate_requests: dict[str, str] = {}  # project -> version announced, filled by the listener
        self.candidate_ttl = float(settings.model_preload_timeout) + CANDIDATE_GRACE_S
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
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

    def candidates(self) -> dict[str, str]:
        """The preloaded, not yet promoted version of each project (at most one each)."""
        return {p: m.version for p, (m, _) in list(self._candidates.items())}

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
            self._candidates.pop(old, None)
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
        formats = serving_formats(bool(self.settings.yolo_serve_int8))
        if info is not None and info.checkpoint.resolve() == Path(path).resolve():
            exports = {fmt: p for fmt in formats if (p := info.export(fmt)) is not None}
        return YoloDetector.load(path, version, exports, self.settings.yolo_device, self.settings.yolo_imgsz,
                                 self.settings.yolo_threads, formats=formats)

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
            preloaded = self._candidates.get(project)
            if preloaded is not None and preloaded[0].version == info.version:
                with self._lock:
                    self._candidates.pop(project, None)
                    if project in self._load_locks:
                        self._models[project] = preloaded[0]  # the swap of a preloaded candidate: nothing to load
                HOTSWAPS.labels("preloaded").inc()
                log.info("project %s now serves YOLO %s (preloaded, was %s)", project, info.version,
                         current and current.version)
                return preloaded[0]
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
                                                      args=(self._redis_url, self._stop, self._wake, self._load_locks,
                                                            self._candidate_requests,
                                                            self._ack_for(self.registry, self.process_id)))
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

    @staticmethod
    def _ack_for(registry: ModelRegistry, process: str) -> Callable[[str, str, str], None]:
        """The listener's way to acknowledge a candidate (a closure over the registry, never the holder)."""
        def ack(project: str, version: str, state: str) -> None:
            try:
                registry.ack_candidate(project, version, process, state)
            except Exception:  # a malformed notice (a project id that is not one) must not end the listener
                log.warning("could not acknowledge candidate %r of project %r", version, project)

        return ack

    def preload_candidates(self) -> None:
        """Load each announced candidate of a served project beside its current model, then acknowledge it."""
        while self._candidate_requests:
            project, version = self._candidate_requests.popitem()
            with self._lock:
                load_lock = self._load_locks.get(project)
            if load_lock is None:  # evicted since the announcement
                self.registry.ack_candidate(project, version, self.process_id, "skipped")
                continue
            state = "loaded"
            with load_lock:
                held = self._candidates.get(project)
                current = self._models.get(project)
                if not ((held and held[0].version == version) or (current and current.version == version)):
                    try:
                        info = self.registry.get(project, version)
                        if info is None:
                            raise FileNotFoundError(f"no version {version} of project {project}")
                        model = self._load(info.checkpoint, version)
                        with self._lock:
                            if project in self._load_locks:
                                self._candidates[project] = (model, time.monotonic())  # replaces an older one
                        HOTSWAPS.labels("candidate").inc()
                        log.info("project %s: candidate %s preloaded", project, version)
                    except Exception:
                        log.exception("project %s: could not preload candidate %s", project, version)
                        state = "failed"
            self.registry.ack_candidate(project, version, self.process_id, state)

    def drop_stale_candidates(self, now: float | None = None) -> list[str]:
        """Forget candidates nobody promoted within ``candidate_ttl`` (memory stays bounded)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [p for p, (_, at) in self._candidates.items() if now - at > self.candidate_ttl]
            dropped = [self._candidates.pop(p)[0].version for p in stale]
        for project, version in zip(stale, dropped):
            HOTSWAPS.labels("candidate_dropped").inc()
            log.info("project %s: candidate %s was never promoted; unloaded", project, version)
        return dropped

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.preload_candidates()
                self.drop_stale_candidates()
            except Exception:
                log.exception("candidate preloading failed")
            for project in list(self._load_locks):
                try:
                    self.registry.reconcile(project)  # disk pointer vs Redis copy: the disk wins
                    self._sync(project, watching=True)
                except Exception:
                    log.exception("hot-swap check failed for project %s", project)
            self._wake.wait(self.settings.hotswap_poll_seconds)
            self._wake.clear()


def _listen(redis_url: str, stop: threading.Event, wake: threading.Event, projects: dict, candidates: dict,
            ack: Callable[[str, str, str], None]) -> None:
    """Wake the watcher on every promotion notice for one of ``projects``; reconnect forever with backoff.

    A candidate notice for a served project is queued in ``candidates`` for the watcher to preload; for any
    other project it is acknowledged at once as ``skipped``, so the training never waits for this process.

    A plain function, not a method: this daemon thread must hold no reference to the holder, or at
    interpreter exit it could be the one to drop the last one and free torch models mid-finalization.
    """
    delay = 0.5
    while not stop.is_set():
        try:
            # no read timeout: the subscriber waits for messages as long as it takes
            client = connect(redis_url, None, connect_timeout=2, health_check_interval=10)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(Keys.MODELS_CHANNEL, Keys.CANDIDATES_CHANNEL)
            delay = 0.5
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    try:
                        data = json.loads(message["data"])
                        project, version = data.get("project"), data.get("version")
                    except (ValueError, TypeError, AttributeError):
                        continue
                    channel = message.get("channel")
                    if (channel.decode() if isinstance(channel, bytes) else channel) == Keys.CANDIDATES_CHANNEL:
                        if not isinstance(version, str):
                            continue
                        if project not in projects:
                            ack(project, version, "skipped")
                            continue
                        candidates[project] = version
                    if project in projects:
                        wake.set()
        except redis_lib.RedisError:
            time.sleep(delay)
            delay = min(delay * 2, 10)
