#!/usr/bin/env bash
# Set up a fresh machine for loopwatch: a virtualenv in .venv with the package and its
# demo/test dependencies, and (with --system) Prometheus/promtool from the system packages.
# Idempotent: re-running it only installs what is missing. PYTHON picks the interpreter and
# VENV the virtualenv's directory (for another Python beside the default one).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
extras="${LOOPWATCH_EXTRAS:-dev}"

if [ "${1:-}" = "--system" ] && ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
