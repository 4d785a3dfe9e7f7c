#!/usr/bin/env bash
# Set up foldformer in .venv: Python >= 3.10 and pip are all it needs.
#
# torch: an NVIDIA machine gets pip's default (CUDA) build; a machine without a GPU gets
# torch==2.13.0, or the build from TORCH_INDEX_URL when set (for example the CPU-only index
# https://download.pytorch.org/whl/cpu). A torch already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install "torch>=2.4"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    python -m pip install "torch==2.13.0"
  fi
fi
python -m pip install -e ".[dev]"
echo "foldformer is installed in .venv ($(.venv/bin/foldformer --version))"
