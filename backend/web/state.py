"""Where the app keeps its services: ``app.extensions["lsb"]``, built on first use.

The services hold Redis clients, an HTTP session and YOLO models, none of which survive a fork:
they are built by the first request that needs them, inside the gunicorn worker, never when
``wsgi`` is imported. ``/health`` never builds them. Routes reach them through
:func:`current_services` and :func:`current_settings`.
"""

from __future__ import annotations

import threading

from flask import Flask, current_app

from backend.core.settings import Settings
from backend.serving.services import Services, build

EXTENSION = "lsb"


class AppServices:
    """The settings an app was created with and its :class:`Services`, built once (thread-safe)."""

    def __init__(self, settings: Settings, services: Services | None = None) -> None:
        self.settings = settings
        self._services = services
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._services is not None

    def get(self) -> Services:
        if self._services is None:
            with self._lock:
                if self._services is None:
                    self._services = build(self.settings)
        return self._services


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
