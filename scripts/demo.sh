#!/usr/bin/env bash
# Set up, then run the demo: the FastAPI backend with loopwatch, and its simulated upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
LOOPWATCH_EXTRAS=demo bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m demo_app "$@"
