"""Where the app keeps its services: ``app.extensions["lsb"]``, built on first use or by the warm-up.

The services hold Redis clients, an HTTP session and YOLO models, none of which survive a fork:
they are built inside the gunicorn worker, never when ``wsgi`` is imported. Under gunicorn the
``post_worker_init`` hook (gunicorn.conf.py) starts :func:`start_warm_up` as soon as the worker has
loaded the app: a background thread builds the services, parses a label config and loads the
current models, so the first ``/setup`` answers as fast as later ones (Label Studio gives it 3 s).
Until then ``/health`` says ``"warming"`` (still 200). Elsewhere (tests, ``flask run``) the first
request that needs the services builds them. ``/health`` never builds them. Routes reach them
through :func:`current_services` and :func:`current_settings`.
"""

from __future__ import annotations

import logging
import threading
import time

import redis as redis_lib
from flask import Flask, current_app

from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings
from backend.serving.services import Services, build

log = logging.getLogger(__name__)

EXTENSION = "lsb"
WARM_UP_THREAD = "lsb-warm-up"
# A config like Label Studio's object-detection template: the first parse imports and builds the
# SDK's tag tables, which the first /setup would otherwise pay for.
WARM_UP_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                  '<Label value="object"/></RectangleLabels></View>')


class AppServices:
    """The settings an app was created with and its :class:`Services`, built once (thread-safe)."""

    def __init__(self, settings: Settings, services: Services | None = None) -> None:
        self.settings = settings
        self._services = services
        self._lock = threading.Lock()
        self.warm_up = "off"  # off (no warm-up started), warming, done, failed
        self.built_by = ""  # the thread that built the services (the warm-up's, or a request's)

    @property
    def built(self) -> bool:
        return self._services is not None

    @property
    def warming(self) -> bool:
        return self.warm_up == "warming"

    def get(self) -> Services:
        if self._services is None:
            with self._lock:
                if self._services is None:
                    started = time.perf_counter()
                    self._services = build(self.settings)
                    self.built_by = threading.current_thread().name
                    log.info("services built in %.2fs by thread %s", time.perf_counter() - started, self.built_by)
        return self._services


def _recent_projects(services: Services, limit: int) -> list[str]:
    """The projects with a current model, most recently promoted first (at most ``limit``)."""
    found = []
    for project in services.registry.projects():
        info = services.registry.current(project)
        if info is None:
            continue
        try:
            found.append((info.path.stat().st_mtime, project))
        except OSError:  # pruned meanwhile
            continue
    return [project for _, project in sorted(found, reverse=True)[:limit]]


def warm_up(slot: AppServices) -> None:
    """Pay now what the first /setup and /predict would: the services, a label config parse, and the
    current model of the most recently promoted projects (as many as ``MODEL_CACHE_SIZE``)."""
    started = time.perf_counter()
    slot.warm_up = "warming"
    try:
        services = slot.get()
        try:
            services.redis.ping()  # opens the pool's first connection, which /setup's registry read would
        except redis_lib.RedisError as exc:  # /health must not depend on Redis; the routes that need it say so
            log.warning("warm-up: Redis did not answer (%s)", exc)
        ProjectConfig.parse(WARM_UP_CONFIG)
        projects = _recent_projects(services, slot.settings.model_cache_size)
        for project in projects:
            services.models.get(project)
    except Exception:  # Redis away, a broken model: requests build or load what they need, as without warm-up
        slot.warm_up = "failed"
        log.exception("warm-up failed after %.2fs; requests will build what they need", time.perf_counter() - started)
        return
    slot.warm_up = "done"
    log.info("warm-up done in %.2fs (services, label config, %d project model(s))", time.perf_counter() - started,
             len(projects))


def start_warm_up(app: Flask) -> threading.Thread:
    """Warm ``app`` up in a daemon thread (gunicorn's ``post_worker_init``); ``/health`` says "warming" until done."""
    slot = app_services(app)
    slot.warm_up = "warming"  # before the thread runs: the worker may answer /health at once
    thread = threading.Thread(target=warm_up, args=(slot,), name=WARM_UP_THREAD, daemon=True)
    thread.start()
    return thread


def install(app: Flask, settings: Settings, services: Services | None = None) -> AppServices:
    app.extensions[EXTENSION] = AppServices(settings, services)
    return app.extensions[EXTENSION]


def app_services(app: Flask | None = None) -> AppServices:
    """The services slot of ``app`` (default: the app handling the current request)."""
    return (app if app is not None else current_app).extensions[EXTENSION]


def current_services() -> Services:
    return app_services().get()


def current_settings() -> Settings:
    return app_services().settings
