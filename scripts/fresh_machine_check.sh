#!/usr/bin/env bash
# Rehearse the README's fresh-machine path without Docker, from a clean clone of the committed HEAD:
#
#   bash scripts/fresh_machine_check.sh WORK            this machine: `env -i`, an empty HOME (nothing
#                                                       under ~/.cache), Debian's python3
#   bash scripts/fresh_machine_check.sh --chroot WORK   a Debian bookworm chroot made by debootstrap with
#                                                       python3, git and ca-certificates only: no make,
#                                                       no venv module, no redis-server, no libGL (root)
#
# In the clone it runs: scripts/bootstrap.sh, make install (a new venv from the locks), then checks that
# cv2 is headless and its native module links no libGL (and, on this machine, that it imports with every
# libGL hidden), that `lsb --help` starts, that make run answers /health with a Redis it starts itself and
# stops everything at SIGTERM, and that make test starts the tests' Redis and passes on the deployment,
# dependency and settings tests (the whole suite is CI's job: hours of CPU). Ports are free ones, so the
# machine's own Redis is never used. WORK holds the clone and the venv (several GB); delete it afterwards.
# Package indexes: pip's configuration of this machine (/etc/pip.conf, /etc/xdg/pip) is used as is, and
# copied into the chroot together with the local folders it names.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '\n[fresh] %s\n' "$*"; }
die() { printf '[fresh] error: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- the checks, run inside the clean clone -------------------------------------------------------
checks() {
    cd "$1"
    log "bootstrap"
    bash scripts/bootstrap.sh
    log "make install"
    make install PYTHON=python3
    local py=.venv/bin/python
    log "cv2: headless, no libGL"
    "$py" -c 'import cv2.version as v; assert v.headless, v.opencv_version; print("cv2", v.opencv_version, "headless")'
    local so
    so="$("$py" -c 'import cv2, glob, os; print(glob.glob(os.path.join(os.path.dirname(cv2.__file__), "cv2*.so"))[0])')"
    if ldd "$so" | grep -E 'libGL|not found'; then die "cv2 needs libGL or a missing library: $so"; fi
    echo "ldd $so: no libGL, nothing missing"
    local libs
    libs="$(ldconfig -p 2>/dev/null | awk '/libGL[.X]/ {print $NF}' | sort -u || true)"
    if [[ -n "$libs" && "$(id -u)" == 0 ]] && command -v unshare >/dev/null; then
        # Every libGL of this machine replaced by an empty file, in a mount namespace of its own.
        unshare -m bash -c 'for lib in '"$(echo $libs)"'; do mount --bind /dev/null "$(readlink -f "$lib")"; done
            '"$py"' -c "import cv2; print(\"import cv2 with libGL hidden: ok\")"'
    elif [[ -z "$libs" ]]; then
        echo "no libGL on this system at all"
    fi
    log "lsb"
    .venv/bin/lsb --help | head -3

    log "make run: /health, its own Redis, SIGTERM"
    local port redis_port run_pid
    port="$(free_port)"
    redis_port="$(free_port)"
    PORT="$port" WORKERS=1 THREADS=2 REDIS_URL="redis://127.0.0.1:$redis_port/0" WEBHOOK_SECRET=fresh-check-secret \
        setsid make run > run.log 2>&1 &
    run_pid=$!
    local i
    for ((i = 0; i < 240; i++)); do
        if "$py" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
            break
        fi
        kill -0 "$run_pid" 2>/dev/null || { cat run.log; die "make run exited"; }
        sleep 1
    done
    ((i < 240)) || { cat run.log; die "/health did not answer in 240 s"; }
    "$py" -c "import urllib.request; print('/health', urllib.request.urlopen('http://127.0.0.1:$port/health').read().decode())"
    grep -F "starting redis-server on 127.0.0.1:$redis_port" run.log
    kill -TERM -- "-$run_pid"
    local up='import sys, socket; sys.exit(0 if socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)'
    for ((i = 0; i < 60; i++)); do
        "$py" -c "$up" "$port" || "$py" -c "$up" "$redis_port" || break
        sleep 1
    done
    ((i < 60)) || { cat run.log; die "gunicorn or the Redis make run started still listens 60 s after SIGTERM"; }
    sleep 2
    tail -4 run.log

    log "make test (lint, the tests' Redis, the deployment, dependency and settings tests)"
    local test_port
    test_port="$(free_port)"
    make test TEST_REDIS_URL="redis://127.0.0.1:$test_port/15" \
        PYTEST_ARGS="-m 'not slow' tests/test_deployment.py tests/test_dependencies.py tests/backend/core/test_settings.py"
    kill "$(cat "var/run/redis-$test_port.pid")" 2>/dev/null || true
    log "all checks passed"
}

# --- pip's configuration (registry access, not a cache) ----------------------------------------------
PIP_USER_CONFIG="${HOME:-/root}/.config/pip/pip.conf"
copy_pip_user_config() {   # into the new HOME $1
    [[ -f "$PIP_USER_CONFIG" ]] || return 0
    mkdir -p "$1/.config/pip"
    cp "$PIP_USER_CONFIG" "$1/.config/pip/pip.conf"
}
pip_cert_files() {   # the CA bundle pip is told to trust (this machine's, which may hold a proxy's CA)
    cat /etc/pip.conf /etc/xdg/pip/pip.conf "$PIP_USER_CONFIG" 2>/dev/null | sed -n 's#^ *cert *= *\(/[^ ]*\).*#\1#p' | sort -u
}
pip_local_folders() {   # local index and find-links folders named by pip's configuration files
    cat /etc/pip.conf /etc/xdg/pip/pip.conf "$PIP_USER_CONFIG" 2>/dev/null \
        | grep -oE '(file://)?/[^ ]+' | sed -e 's#^file://##' -e 's#/simple/*$##' | grep -v '^/etc/' | sort -u
}

# --- entry --------------------------------------------------------------------------------------
if [[ "${1:-}" == --inside ]]; then   # the second stage: already in the clean environment
    checks "$2"
    exit 0
fi
chroot_mode=""
if [[ "${1:-}" == --chroot ]]; then chroot_mode=1; shift; fi
[[ $# == 1 ]] || die "usage: $0 [--chroot] WORKDIR"
WORK="$(mkdir -p "$1" && cd "$1" && pwd)"
PATH_CLEAN=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if [[ -z "$chroot_mode" ]]; then
    rm -rf "$WORK/clone" "$WORK/home"
    git clone --quiet "$ROOT" "$WORK/clone"
    mkdir -p "$WORK/home"
    copy_pip_user_config "$WORK/home"
    log "clean clone of $(git -C "$WORK/clone" log -1 --format='%h %s') in $WORK/clone; HOME=$WORK/home"
    exec env -i HOME="$WORK/home" PATH="$PATH_CLEAN" LANG=C.UTF-8 bash "$WORK/clone/scripts/fresh_machine_check.sh" \
        --inside "$WORK/clone"
fi

[[ "$(id -u)" == 0 ]] || die "--chroot needs root"
command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
FS="$WORK/rootfs"
if [[ ! -x "$FS/usr/bin/python3" ]]; then
    log "debootstrap bookworm into $FS (python3, git, ca-certificates)"
    debootstrap --variant=minbase --include=python3,git,ca-certificates bookworm "$FS" http://deb.debian.org/debian
fi
rm -rf "$FS/src"
git clone --quiet "$ROOT" "$FS/src"
cp /etc/resolv.conf "$FS/etc/resolv.conf"
# This machine's pip configuration and the local package folders it points at.
mkdir -p "$FS/root"
copy_pip_user_config "$FS/root"
for path in /etc/pip.conf /etc/xdg/pip $(pip_local_folders) $(pip_cert_files); do
    [[ -e "$path" ]] || continue
    mkdir -p "$FS$(dirname "$path")"
    if [[ -d "$path" ]]; then mkdir -p "$FS$path"; mount --bind "$path" "$FS$path"; else cp "$path" "$FS$path"; fi
done
for fs in proc sys dev dev/pts; do mkdir -p "$FS/$fs"; mount --bind "/$fs" "$FS/$fs"; done
cleanup() { for fs in dev/pts dev sys proc; do umount -l "$FS/$fs" 2>/dev/null || true; done
            grep -o " $FS/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
log "chroot $FS: $(chroot "$FS" python3 --version); make: $(chroot "$FS" sh -c 'command -v make || echo none')"
chroot "$FS" env -i HOME=/root PATH="$PATH_CLEAN" LANG=C.UTF-8 bash /src/scripts/fresh_machine_check.sh --inside /src
