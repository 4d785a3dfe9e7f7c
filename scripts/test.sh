#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, check formatting and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The PyPI peers the adapters wrap, so their tests run too. block-recurrent-transformer-pytorch
# is left out here: a dependency of it pulls faiss-gpu and CUDA libraries it never imports.
python -m pip install -q recurrent-memory-transformer-pytorch infini-transformer-pytorch \
  x-transformers
ruff check .
ruff format --check .
python -m pytest "$@"
