"""What every benchmark shares: where it works, the benchmark Redis, the offline environment, its context.

Every benchmark module exposes ``NAME``, ``TITLE`` and ``run(ctx) -> Result``; the pieces it builds
results from live beside this module: :mod:`bench.stats` (timing and statistics), :mod:`bench.results`
(rows and results), :mod:`bench.report` (BENCHMARKS.md and the machine), :mod:`bench.fixtures`
(images, datasets, trained checkpoints, fake Gemini answers) and :mod:`bench.servers` (the backend
under gunicorn, load generation).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # bench.results imports nothing from here; the name is for annotations only
    from bench.results import Result

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var" / "bench"
CACHE = VAR / "cache"
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
CLASSES = ("Car", "Person", "Sign")
# Training children run with OpenMP threads that sleep instead of spin when they wait: on a shared
# 2-core host the default spin-wait made training 4-7x slower (see the training benchmark's rows).
TRAIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def setup_environment() -> None:
    """Offline Ultralytics for this process and every child (docs/ultralytics.md#no-network)."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(VAR / "ultralytics"))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("CI", "true")  # OpenVINO telemetry opt-out
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def package_version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "not installed"


@dataclass
class Context:
    """What every benchmark gets: mode, a private work folder, the benchmark Redis, a logger."""

    quick: bool
    workdir: Path
    redis_url: str = BENCH_REDIS_URL
    verbose: bool = True
    on_partial: Callable[[Result], None] | None = None
    _started: float = field(default_factory=time.monotonic)

    def partial(self, result: Result) -> None:
        """Write the figures measured so far (long benchmarks call this after each step)."""
        if self.on_partial is not None:
            self.on_partial(result)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[bench {time.monotonic() - self._started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def tmp(self, name: str) -> Path:
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)


def project_id() -> str:
    """A project id nobody else uses in the benchmark Redis (keys are per project)."""
    return str(700000000 + uuid.uuid4().int % 99999999)


def new_workdir() -> Path:
    VAR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=VAR))
