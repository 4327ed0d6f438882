#!/usr/bin/env bash
# Set up a fresh machine for loopwatch: a virtualenv in .venv with the package and its
# demo/test dependencies, and (with --system) the system packages the tests drive for real:
# Prometheus/promtool, VictoriaMetrics (with vmalert), Chromium for the browser tests, wrk.
# Idempotent: re-running it only installs what is missing. PYTHON picks the interpreter and
# VENV the virtualenv's directory (for another Python beside the default one), LOOPWATCH_PINS
# adds requirements to hold (a second venv with the oldest frameworks allowed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
if [ -n "${PYTHON:-}" ] && [ -x "$VENV/bin/python" ]; then
    # An interpreter asked for by name: a virtualenv of another Python is made again.
    version='import sys; print(*sys.version_info[:2])'
    if [ "$("$PYTHON" -c "$version")" != "$("$VENV/bin/python" -c "$version")" ]; then
        rm -rf "$VENV"
    fi
fi
PYTHON="${PYTHON:-python3}"
extras="${LOOPWATCH_EXTRAS:-dev}"

# command -> Debian package
system_packages=(
    "promtool:prometheus"
    "victoria-metrics:victoria-metrics"
    "prometheus-alertmanager:prometheus-alertmanager"
    "chromium:chromium"
    "wrk:wrk"
    "openssl:openssl"
)

if [ "${1:-}" = "--system" ]; then
    missing=()
    for entry in "${system_packages[@]}"; do
        command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        sudo=""
        [ "$(id -u)" = "0" ] || sudo="sudo"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# LOOPWATCH_PINS: extra requirements to hold (e.g. the oldest FastAPI the project allows).
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[${extras}]" ${LOOPWATCH_PINS:-}
