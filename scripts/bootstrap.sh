#!/usr/bin/env bash
# Install the system packages `make run` and `make test` need on a fresh Debian/Ubuntu machine that has
# only Python 3.11: make, Python's venv module (python3-venv) and redis-server, each only when missing.
#
#   sudo bash scripts/bootstrap.sh      (or as root; .ci/run does the same)   then: make run / make test
#
# Nothing else comes from the system: OpenCV is the headless wheel (no libGL), everything Python from
# the locks. Without root it prints the apt-get line to run instead.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
missing=()
command -v make >/dev/null 2>&1 || missing+=(make)
# Debian's python3 ships venv/ensurepip in a separate package; a Python built elsewhere has them.
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    minor="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    missing+=("python$minor-venv")
fi
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The status page's browser tests (tests/backend/web/test_status_browser.py): Debian's headless Chromium and its
# driver, so selenium never downloads a browser at run time.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if ((${#missing[@]} == 0)); then
    echo "[bootstrap] nothing to install: make, $PYTHON -m venv, redis-server, chromium and chromedriver are there"
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "[bootstrap] missing: ${missing[*]}. Run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
command -v apt-get >/dev/null 2>&1 || { echo "[bootstrap] no apt-get: install ${missing[*]} by hand" >&2; exit 1; }
echo "[bootstrap] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[bootstrap] installed ${missing[*]}"
