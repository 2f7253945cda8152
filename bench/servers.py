"""The backend under test: gunicorn as deployed against the benchmark Redis, load generation, state resets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backend.core import keys
from bench.common import ROOT, VAR, Context


class Backend:
    """The backend under gunicorn (tests.live.gunicorn) with a fake Label Studio serving its images."""

    def __init__(self, url: str, log_path: Path, ls, env: dict[str, str]):
        self.url = url
        self.log_path = log_path
        self.ls = ls
        self.env = env

    def worker_pids(self) -> list[int]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", text)]
        import psutil

        return [p for p in dict.fromkeys(pids) if psutil.pid_exists(p)]


@contextmanager
def backend(ctx: Context, name: str, workers: int = 1, threads: int = 8, ls=None, **settings: Any) -> Iterator[Backend]:
    """Start gunicorn as deployed (gunicorn.conf.py) against the benchmark Redis; ``settings`` become env vars."""
    from tests.fake_label_studio import FakeLabelStudio
    from tests.live import base_env, gunicorn

    work = ctx.tmp(name)
    own_ls = ls is None
    ls = ls or FakeLabelStudio().start()
    try:
        env = base_env(REDIS_URL=ctx.redis_url, MODEL_DIR=work / "models", DATA_DIR=work / "data",
                       LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat,
                       YOLO_CONFIG_DIR=os.environ.get("YOLO_CONFIG_DIR", str(VAR / "ultralytics")),
                       **{k.upper(): str(v) for k, v in settings.items()})
        log_path = work / "gunicorn.log"
        with gunicorn(env, log_path, workers=workers, threads=threads) as url:
            yield Backend(url, log_path, ls, env)
    finally:
        if own_ls:
            ls.stop()


def cleanup_redis(ctx: Context, project: str) -> None:
    """Drop the benchmark project's keys from the benchmark Redis."""
    try:
        client = ctx.redis()
        for pattern in keys.project_patterns(project):
            for key in client.scan_iter(match=pattern, count=500):
                client.delete(key)
    except Exception:
        pass


# --- load generation -----------------------------------------------------------------------------

def start_load(url: str, path: str, out: Path, rate: float, duration: float, bodies: list | None = None,
               threads: int = 16, timeout: float = 30.0, start_at: float = 0.0) -> subprocess.Popen:
    """``bench.loadgen`` in its own process (see there); read its records with :func:`finish_load`."""
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--path", path, "--rate", str(rate),
           "--duration", str(duration), "--threads", str(threads), "--timeout", str(timeout), "--out", str(out)]
    if bodies is not None:
        body_file = out.with_suffix(".bodies.json")
        body_file.write_text(json.dumps(bodies))
        cmd += ["--bodies", str(body_file)]
    if start_at:
        cmd += ["--start-at", str(start_at)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def finish_load(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> list[dict]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []


def gemini_state_reset(ctx: Context) -> None:
    """Forget Gemini's cached answers, breaker and spend counters in the benchmark Redis (global keys),
    so figures never depend on an earlier run."""
    try:
        client = ctx.redis()
        for pattern in keys.gemini_patterns():
            for key in client.scan_iter(match=pattern, count=500):
                client.delete(key)
    except Exception:
        pass
