#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, check formatting and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest "$@"
