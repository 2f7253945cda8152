#!/usr/bin/env bash
# Make sure Redis answers at a URL, starting a private redis-server when the URL points at this machine.
# One implementation for `make run` (scripts/run.sh sources this file) and `make test` (make redis runs it).
#
#   bash scripts/redis.sh [URL]   answer, or start one that keeps running (make redis: the tests' Redis)
#   . scripts/redis.sh            define redis_ping, redis_ensure and redis_stop_started (scripts/run.sh,
#                                 which stops at exit the server it started)
#
# - URL: the argument, else REDIS_URL, else redis://127.0.0.1:6379/0. Pinged with the venv's redis
#   client ($VENV/bin/python, VENV defaulting to ./.venv), so a password or a db in the URL is honoured.
# - redis-server missing: installed with apt-get when running as root on Debian/Ubuntu (the package is
#   the only way to get a server: PyPI has none for Python 3.11); otherwise the error says what to do.
# - The server binds the URL's host and port, takes the URL's password, keeps nothing on disk unless
#   REDIS_PERSIST=1 (then append-only under $VAR_DIR/redis), and writes its log and pid file under
#   $VAR_DIR/run (redis-PORT.log, redis-PORT.pid).

_REDIS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REDIS_STARTED_PID=""

redis_log() { printf '[redis] %s\n' "$*"; }
redis_fail() { printf '[redis] error: %s\n' "$*" >&2; return 1; }

_redis_python() { printf '%s' "${VENV:-$_REDIS_ROOT/.venv}/bin/python"; }

# Exit status 0 when a Redis answers PING at $1.
redis_ping() {
    "$(_redis_python)" - "$1" <<'PY' >/dev/null 2>&1
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1, socket_timeout=2).ping()
PY
}

# Prints "host port password" when $1 points at this machine, nothing otherwise.
redis_local_target() {
    "$(_redis_python)" - "$1" <<'PY'
import sys
from urllib.parse import unquote, urlsplit
url = urlsplit(sys.argv[1])
host = url.hostname or "127.0.0.1"
if url.scheme == "redis" and host in ("127.0.0.1", "localhost", "::1"):
    host = "127.0.0.1" if host == "localhost" else host
    print(host, url.port or 6379, unquote(url.password or ""))
PY
}

# Installs Debian's redis-server when running as root; fails with what to do otherwise.
redis_install_server() {
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        redis_log "redis-server is missing: installing it with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
        command -v redis-server >/dev/null 2>&1 || redis_fail "apt-get installed no redis-server"
    else
        redis_fail "redis-server is not installed.
    Install it (Debian/Ubuntu: sudo apt-get install redis-server, or sudo bash scripts/bootstrap.sh;
    macOS: brew install redis), or point the URL at a running Redis."
    fi
}

# Starts redis-server for $1 (a local URL) and waits until it answers; sets REDIS_STARTED_PID.
redis_start() {
    local url="$1" target host port password var_dir run_dir
    target="$(redis_local_target "$url")"
    [[ -n "$target" ]] || { redis_fail "nothing answers at $url (not a local URL, so not starting one)"; return 1; }
    read -r host port password <<<"$target"
    if ! command -v redis-server >/dev/null 2>&1; then
        redis_install_server || return 1
        # The package may have started its own service on that port.
        if redis_ping "$url"; then redis_log "Redis answers at $url"; return 0; fi
    fi
    var_dir="${VAR_DIR:-$_REDIS_ROOT/var}"
    run_dir="$var_dir/run"
    mkdir -p "$run_dir"
    local pidfile="$run_dir/redis-$port.pid" logfile="$run_dir/redis-$port.log"
    local args=(--daemonize yes --bind "$host" --port "$port" --dir "$run_dir" --logfile "$logfile" --pidfile "$pidfile")
    if [[ "${REDIS_PERSIST:-0}" == 1 ]]; then
        mkdir -p "$var_dir/redis"
        args+=(--dir "$var_dir/redis" --appendonly yes)
    else
        args+=(--save "" --appendonly no)
    fi
    [[ -z "$password" ]] || args+=(--requirepass "$password")
    redis_log "starting redis-server on $host:$port (log: $logfile)"
    rm -f "$pidfile"
    redis-server "${args[@]}" || { redis_fail "redis-server did not start, see $logfile"; return 1; }
    local i
    for ((i = 0; i < 50; i++)); do
        if redis_ping "$url"; then
            REDIS_STARTED_PID="$(cat "$pidfile" 2>/dev/null || true)"
            return 0
        fi
        sleep 0.1
    done
    redis_fail "redis-server started but does not answer at $url, see $logfile"
}

# Redis answers at $1 afterwards, or this fails with the reason.
redis_ensure() {
    if redis_ping "$1"; then
        redis_log "Redis answers at $1"
    else
        redis_start "$1"
    fi
}

# Stops the server redis_start started (run.sh at exit); nothing otherwise.
redis_stop_started() {
    [[ -n "$REDIS_STARTED_PID" ]] || return 0
    redis_log "stopping the redis-server started here (pid $REDIS_STARTED_PID)"
    kill -TERM "$REDIS_STARTED_PID" 2>/dev/null || { REDIS_STARTED_PID=""; return 0; }
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$REDIS_STARTED_PID" 2>/dev/null || { REDIS_STARTED_PID=""; return 0; }
        sleep 0.1
    done
    kill -KILL "$REDIS_STARTED_PID" 2>/dev/null || true
    REDIS_STARTED_PID=""
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    url="${1:-${REDIS_URL:-redis://127.0.0.1:6379/0}}"
    [[ -x "$(_redis_python)" ]] || { redis_fail "no virtualenv at ${VENV:-$_REDIS_ROOT/.venv}: run 'make install' first"; exit 1; }
    redis_ensure "$url"
fi
