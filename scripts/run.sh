#!/usr/bin/env bash
# Run the ML backend in the foreground: the HTTP API (gunicorn) and one RQ worker, on Redis.
#
#   scripts/run.sh            (or: make run)      Ctrl-C / SIGTERM stops everything.
#
# - Settings come from the environment, then from ./.env (ENV_FILE) for what the environment leaves
#   unset; see `python -m backend.core.settings`. PORT (9090), WORKERS (2), THREADS (8), REDIS_URL.
# - If nothing answers at REDIS_URL and it points at this machine, a private redis-server is started
#   by scripts/redis.sh (installed with apt-get when missing and root; no persistence unless
#   REDIS_PERSIST=1; log and pid under var/run/) and stopped again at exit.
# - Runtime files live under VAR_DIR (./var): Ultralytics config, Prometheus multiprocess files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[run] %s\n' "$*"; }
die() { printf '[run] error: %s\n' "$*" >&2; exit 1; }

# --- configuration -----------------------------------------------------------------------------
ENV_FILE="${ENV_FILE:-$ROOT/.env}"
if [[ -f "$ENV_FILE" ]]; then
    # Variables already in the environment (e.g. `make run PORT=9191`) win over the file.
    __run_saved_env="$(export -p)"
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    set +a
    eval "$__run_saved_env" 2>/dev/null || true
    unset __run_saved_env
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # in case the file set ROOT
    log "loaded $ENV_FILE"
fi

export PORT="${PORT:-9090}"
export WORKERS="${WORKERS:-2}"
export THREADS="${THREADS:-8}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
VENV="${VENV:-$ROOT/.venv}"
VAR_DIR="${VAR_DIR:-$ROOT/var}"
mkdir -p "$VAR_DIR" && VAR_DIR="$(cd "$VAR_DIR" && pwd)"
RUN_DIR="$VAR_DIR/run"
STOP_TIMEOUT="${STOP_TIMEOUT:-10}"   # seconds for a warm stop before jobs are killed

PY="$VENV/bin/python"
[[ -x "$PY" && -x "$VENV/bin/gunicorn" && -x "$VENV/bin/rq" ]] \
    || die "no virtualenv with gunicorn and rq at $VENV: run 'make install' first"

mkdir -p "$RUN_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Ultralytics without network (docs/ultralytics.md#no-network); the backend sets these too.
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0
# Training shares the cores with serving: its spin-waiting OpenMP threads made a training step 6x
# slower beside other CPU work (BENCHMARKS.md section 7), so the rq worker runs with PASSIVE. The web
# processes keep OpenMP's default: PASSIVE there made a 1-image YOLO predict ~2x slower (section 2).
# An OMP_WAIT_POLICY set by the caller applies to both.
WORKER_OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$VAR_DIR/ultralytics}"
mkdir -p "$YOLO_CONFIG_DIR"

# --- Redis -------------------------------------------------------------------------------------
# redis_ping / redis_ensure / redis_stop_started: the same code `make test` uses (scripts/redis.sh).
# shellcheck source=scripts/redis.sh
. "$ROOT/scripts/redis.sh"

# --- children ----------------------------------------------------------------------------------
WEB_PID=""
WORKER_PID=""
PROM_DIR=""
STOP_REQUESTED=""
FORCE=""

# Prefix each line of a child's output; ignore Ctrl-C so the last log lines still get through.
prefix() { trap '' INT TERM; exec sed -u "s/^/[$1] /"; }

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

# Direct and indirect children of a pid (for the last-resort SIGKILL).
descendants() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || true); do
        descendants "$child"
        echo "$child"
    done
}

stop_children() {
    local pids=() pid
    for pid in "$WEB_PID" "$WORKER_PID"; do alive "$pid" && pids+=("$pid"); done
    ((${#pids[@]})) || return 0
    log "stopping gunicorn and the rq worker"
    # gunicorn: graceful stop (graceful_timeout 10 s); rq: warm stop, a running job may finish.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local cold_at=$((SECONDS + STOP_TIMEOUT)) kill_at=$((SECONDS + STOP_TIMEOUT + 5)) cold_sent=""
    while alive "$WEB_PID" || alive "$WORKER_PID"; do
        if [[ -z "$cold_sent" ]] && { [[ -n "$FORCE" ]] || ((SECONDS >= cold_at)); }; then
            # A second Ctrl-C, or the warm stop took too long: rq's cold stop kills the running
            # job, gunicorn's SIGINT is its quick shutdown.
            log "cold stop"
            alive "$WORKER_PID" && kill -TERM "$WORKER_PID" 2>/dev/null || true
            alive "$WEB_PID" && kill -INT "$WEB_PID" 2>/dev/null || true
            cold_sent=1
            kill_at=$((SECONDS + 5))
        elif ((SECONDS >= kill_at)); then
            log "killing what is left"
            for pid in "$WEB_PID" "$WORKER_PID"; do
                alive "$pid" || continue
                # shellcheck disable=SC2046
                kill -KILL $(descendants "$pid") "$pid" 2>/dev/null || true
            done
            break
        fi
        sleep 0.2 &
        wait $! 2>/dev/null || true
    done
    wait "$WEB_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
}

cleanup() {
    local status=$?
    [[ -n "$STOP_REQUESTED" ]] || STOP_REQUESTED=EXIT   # from here on, a signal means "hurry up"
    stop_children
    redis_stop_started
    [[ -z "$PROM_DIR" ]] || rm -rf "$PROM_DIR"
    wait 2>/dev/null || true   # the log prefixers
    log "stopped"
    exit "$status"
}

on_signal() {
    if [[ -n "$STOP_REQUESTED" ]]; then FORCE=1; fi
    STOP_REQUESTED="$1"
}

# --- start -------------------------------------------------------------------------------------
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

redis_ensure "$REDIS_URL" || die "no Redis at $REDIS_URL (see above)"

# Validates the settings (a bad value stops here with pydantic's message) and reports Gemini's mode.
"$PY" - <<'PY' || die "invalid configuration (see above)"
from backend.core.settings import get_settings
s = get_settings()
if s.gemini_enabled:
    print(f"[run] Gemini on: model {s.gemini_model}, routing {s.routing}")
else:
    print("[run] Gemini key not set: serving with the YOLO fallback only")
if s.webhook_secret.get_secret_value() == "replace-with-a-long-random-string":
    print("[run] warning: WEBHOOK_SECRET is still the placeholder from .env.example")
PY

# A fresh Prometheus multiprocess folder per run, shared by gunicorn's workers and the rq worker.
PROM_DIR="$(mktemp -d "$RUN_DIR/prometheus.XXXXXX")"
export PROMETHEUS_MULTIPROC_DIR="$PROM_DIR"

# Queue names as the backend computes them (worker/queue.py: LSB_QUEUE_PREFIX + name; tests set it).
QUEUE_PREFIX="${LSB_QUEUE_PREFIX:-}"
log "serving on port $PORT with $WORKERS gunicorn workers x $THREADS threads; rq worker on queues ${QUEUE_PREFIX}training, ${QUEUE_PREFIX}prelabel"
# Each child in its own process group (job control on): a terminal's Ctrl-C reaches only this script,
# which then sends each child exactly one stop signal. (Seen with rq 3.0: the terminal's SIGINT plus
# this script's SIGTERM arriving together sometimes went unnoticed until the cold stop.)
set -m
"$VENV/bin/gunicorn" -c gunicorn.conf.py backend.web.wsgi:app < /dev/null > >(prefix web) 2>&1 &
WEB_PID=$!
OMP_WAIT_POLICY="$WORKER_OMP_WAIT_POLICY" "$VENV/bin/rq" worker --url "$REDIS_URL" --with-scheduler "${QUEUE_PREFIX}training" "${QUEUE_PREFIX}prelabel" \
    < /dev/null > >(prefix worker) 2>&1 &
WORKER_PID=$!
set +m

# Until a signal arrives or a child dies.
while [[ -z "$STOP_REQUESTED" ]] && alive "$WEB_PID" && alive "$WORKER_PID"; do
    sleep 1 &
    wait $! 2>/dev/null || true
done

if [[ -n "$STOP_REQUESTED" ]]; then
    log "got SIG$STOP_REQUESTED"
    exit 0
fi
status=0
for name in WEB_PID WORKER_PID; do
    if ! alive "${!name}"; then
        wait "${!name}" && rc=0 || rc=$?
        [[ $name == WEB_PID ]] && what=gunicorn || what="rq worker"
        log "$what exited unexpectedly (status $rc): stopping"
        status=1
    fi
done
exit "$status"
