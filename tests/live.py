"""Real processes for tests: gunicorn serving the backend, `rq worker`s, free ports, polling (the one copy of each)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, message: str = "condition", interval: float = 0.2,
             on_timeout: Callable[[], str] | None = None):
    """Poll ``predicate()`` until it is truthy and return that value; fail with ``message`` on timeout.

    An exception counts as "not yet" (a server still starting, a file not written yet); the last one,
    and ``on_timeout()`` (a log tail, say), go into the failure so a timeout explains itself.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - any error means "not ready yet"; reported on timeout
            last_error = exc
        if time.monotonic() >= deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}"
                                 + (f" (last error: {last_error!r})" if last_error else "") + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_API", "BASIC_AUTH", "WEBHOOK_"))}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextmanager
def gunicorn(env: dict[str, str], log_path: Path, workers: int = 2, threads: int = 8) -> Iterator[str]:
    """The backend as deployed (gunicorn.conf.py, gthread); yields its base URL."""
    port = free_port()
    env = {**env, "PORT": str(port), "WORKERS": str(workers), "THREADS": str(threads), "BIND": f"127.0.0.1:{port}"}
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in env:
        prom = log_path.parent / f"prom-{port}"
        prom.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "backend.web.wsgi:app"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # "UP", not just 200: the worker's warm-up (gunicorn.conf.py post_worker_init) is done.
        wait_for(lambda: requests.get(f"{url}/health", timeout=1).json()["status"] == "UP", timeout=60,
                 message=f"gunicorn to answer {url}/health", on_timeout=lambda: log_path.read_text(errors="replace")[-3000:])
        yield url
    finally:
        _stop(proc)


@contextmanager
def rq_worker(env: dict[str, str], queues: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """One `rq worker` process on the given queues (as scripts/run.sh starts it)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(BIN / "rq"), "worker", "--url", env["REDIS_URL"], *queues],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)
