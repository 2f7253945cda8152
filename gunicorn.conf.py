"""Gunicorn settings of the ML backend: ``gunicorn -c gunicorn.conf.py backend.web.wsgi:app``.

Used as is by ``scripts/run.sh`` (``make run``) and by the Docker image. Environment:
PORT (9090), WORKERS (2), THREADS (8), BIND (overrides 0.0.0.0:$PORT), LOG_LEVEL (INFO),
PROMETHEUS_MULTIPROC_DIR (set it whenever WORKERS > 1 so /metrics sums every process).
"""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


bind = os.environ.get("BIND", "").strip() or f"0.0.0.0:{_int('PORT', 9090)}"
workers = _int("WORKERS", 2)
threads = _int("THREADS", 8)
worker_class = "gthread"
# Label Studio waits 100 s for /predict (ML_TIMEOUT_PREDICT); give a request a little longer.
timeout = 120
graceful_timeout = 10
keepalive = 5
# Each worker loads its own models: no preload (torch and fork do not mix).
preload_app = False
# Heartbeat files on tmpfs: a slow disk (or Docker's overlayfs) must not look like a hung worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
# Gunicorn >= 25.1 opens a control socket at ~/.gunicorn/gunicorn.ctl by default; two instances on
# one machine would fight over it, and nothing here uses gunicornc.
control_socket_disable = True

loglevel = os.environ.get("LOG_LEVEL", "info").strip().lower() or "info"
errorlog = "-"
accesslog = "-"
# The path only (%(U)s), never the request line (%(r)s) or the query string (%(q)s): the webhook
# may carry its shared secret as ?token=. No referrer either, for the same reason.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms "%(a)s"'
# The path and the user agent are the caller's: the logger replaces every configured secret (also percent-
# encoded) with *** in access and error lines, so /webhook/<secret> logs /webhook/*** (backend/core/logs.py).
logger_class = "backend.core.logs.GunicornLogger"
# This folder on sys.path, so logger_class imports whatever folder gunicorn is started from.
pythonpath = os.path.dirname(os.path.abspath(__file__))


def on_starting(server) -> None:
    """Refuse to start with invalid settings (e.g. the .env.example placeholder secret) before any worker
    forks: a worker failing to load the app is only respawned, forever. Then create the Prometheus
    multiprocess folder if it is configured but missing."""
    from pydantic import ValidationError  # here, not at the top: gunicorn reads this file before `pythonpath`

    from backend.core.settings import Settings  # applies, so `backend` imports only from the hooks

    try:
        Settings()
    except ValidationError as exc:
        raise RuntimeError(f"invalid configuration, not starting:\n{exc}") from None  # gunicorn prints it, exits 1
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)


def post_worker_init(worker) -> None:
    """Warm the worker up in the background as soon as it has loaded the app: the first /setup must
    answer within Label Studio's 3 s. /health says "warming" (still 200) until it is done."""
    from backend.web.state import start_warm_up  # here, not at the top: the master never imports the app
    from backend.web.wsgi import app  # the app the worker just loaded (worker.wsgi may be wrapped)

    start_warm_up(app)


def child_exit(server, worker) -> None:
    """Drop the live gauges of a worker that exited (Prometheus multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker) -> None:
    """Skip the interpreter's teardown in a stopping worker: with torch loaded it takes seconds,
    long enough under load for the stop to escalate to SIGQUIT. Logs are flushed first; the
    master's child_exit still runs."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
