#!/usr/bin/env bash
# Set up, then run every test, as CI does: the whole suite on the newest Python the README
# names, with the compiled hot path and again in pure Python; the loopwatch tests (all but
# those marked `system`: the demo, dashboards, stack, fleet and browser pages) on the oldest
# Python, compiled and in pure Python; the framework-dependent tests on the oldest FastAPI/Starlette and OpenTelemetry
# allowed; ruff and mypy.
# Arguments go to every pytest run. PYTHON_OLDEST / PYTHON_NEWEST choose the interpreters.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # the first interpreter of this minor version: pyenv's, or the system's
    local found
    for found in "$HOME"/.pyenv/versions/"$1".*/bin/python3 /usr/bin/python"$1"; do
        if [ -x "$found" ]; then echo "$found"; return 0; fi
    done
    echo "no Python $1: install it (pyenv install $1) or set PYTHON_OLDEST/PYTHON_NEWEST" >&2
    return 1
}
PYTHON_OLDEST="${PYTHON_OLDEST:-$(find_python 3.10)}"
PYTHON_NEWEST="${PYTHON_NEWEST:-$(find_python 3.13)}"
OLDEST_PINS="fastapi==0.110.1 starlette==0.37.2 opentelemetry-api==1.30.0 opentelemetry-sdk==1.30.0
    opentelemetry-exporter-otlp-proto-http==1.30.0 opentelemetry-proto==1.30.0"

PYTHON="$PYTHON_NEWEST" VENV=.venv bash scripts/setup.sh --system
PYTHON="$PYTHON_OLDEST" VENV=.venv-oldest bash scripts/setup.sh
PYTHON="$PYTHON_OLDEST" VENV=.venv-oldest-frameworks LOOPWATCH_PINS="$OLDEST_PINS" \
    bash scripts/setup.sh

status=0
run() {  # run <title> <venv> [env...] -- pytest args
    local title="$1" venv="$2"; shift 2
    local env=()
    while [ "$1" != "--" ]; do env+=("$1"); shift; done
    shift
    echo "== $title ($("$venv/bin/python" -c 'import platform; print(platform.python_version())'))"
    env "${env[@]}" "$venv/bin/python" -m pytest "$@" || status=1
}

run "everything, compiled" .venv -- "$@"
run "everything, pure Python" .venv LOOPWATCH_PURE_PYTHON=1 -- "$@"
run "loopwatch, compiled" .venv-oldest -- -m "not system" "$@"
run "loopwatch, pure Python" .venv-oldest LOOPWATCH_PURE_PYTHON=1 -- -m "not system" "$@"
run "with $OLDEST_PINS" .venv-oldest-frameworks -- "$@" tests/test_routes.py \
    tests/test_middleware.py tests/test_last_step.py tests/test_bounded_state.py \
    tests/test_readme.py tests/test_otel.py tests/test_admission.py tests/test_waiting.py

echo "== ruff and mypy --strict"
.venv/bin/python -m pip install -q --disable-pip-version-check "ruff==0.17.6" "mypy==2.4.1"
.venv/bin/ruff check . || status=1
.venv/bin/mypy || status=1
exit "$status"
