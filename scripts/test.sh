#!/usr/bin/env bash
# Set up, then run every test (unit, real-server, plugin, promtool rules, end-to-end stack).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
