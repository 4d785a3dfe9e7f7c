#!/usr/bin/env bash
# Serving on one GPU, under 6 minutes: ingestion speed and peak memory from 1K to 10M tokens,
# the time to answer from a saved state against re-reading the book, and the session server's
# load test with cross-session batching off and on.
#
#   PYTHONPATH=src bash benchmarks/serve_gpu.sh OUT            # on a machine with a GPU
#   SMOKE=1 PYTHONPATH=src bash benchmarks/serve_gpu.sh OUT    # toy sizes on a CPU (a test)
#
# INGEST="--cuda-graph" (the default on a GPU) or "--compile" picks how contexts are read
# (Engine's options; the 2026-12-01 run used --compile: launch-bound, 1M-10M skipped);
# LOAD=0 skips the load test; BUDGET=SECONDS for the ingestion lengths (default 150).
#
# Model: a random-init folded model of the `seed` preset's shape (d 384, 6 layers, w = m = 12,
# bytes), saved as a checkpoint both benchmarks load: ingestion and decoding cost the same
# for trained and untrained weights, so no training is spent here. Writes under OUT:
# ingest.json, serve_load_batching_off.json, serve_load_batching_on.json, serve_gpu.log.
set -uo pipefail
out=${1:?usage: bash benchmarks/serve_gpu.sh OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [[ ${SMOKE:-0} == 1 ]]; then
  device=cpu lengths=1K,10M budget=20 book=1K sessions=3 requests=4 ingest_option="" threads=1
  ingest_limit=120 load_limit=120
else
  device=cuda lengths=1K,4K,16K,64K,256K,1M,4M,10M budget=${BUDGET:-150} book=256K sessions=32
  requests=20 ingest_option=${INGEST:---cuda-graph} threads=0 ingest_limit=$((${BUDGET:-150} + 80)) load_limit=55
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "serve_gpu.sh: no CUDA device here (SMOKE=1 runs the CPU toy sizes)" >&2; exit 2; }
fi
log="$out/serve_gpu.log"
checkpoint=$(mktemp -d)/seed_random
"$python" - "$checkpoint" <<'EOF' 2>&1 | tee "$log"
import sys

import torch

from foldformer.data.tokenizers import ByteTokenizer
from foldformer.models import build_model
from foldformer.presets import PRESETS

torch.manual_seed(0)
shape = {k: v for k, v in PRESETS["seed"]["model"].items() if k != "model_type"}
build_model("folded", {"vocab_size": 257, **shape}).save_pretrained(sys.argv[1])
ByteTokenizer().save(sys.argv[1])
print("random-init seed-shape checkpoint:", shape)
EOF
"$python" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() \
  if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$log"

# Ingestion: lengths run in increasing order while the budget lasts (the JSON says which
# were skipped and why); timeout keeps the whole script bounded even if a length runs long.
timeout "$ingest_limit" "$python" benchmarks/ingest.py --out "$out/ingest.json" \
  --device "$device" --checkpoint "$checkpoint" $ingest_option --lengths "$lengths" \
  --budget "$budget" --book "$book" --threads "$threads" 2>&1 | tee -a "$log"

# The load test (32 sessions x 20 requests), batching off, then on (the server's CUDA default).
for batching in $([[ ${LOAD:-1} == 1 ]] && echo off on); do
  window=$([[ $batching == on ]] && echo 5 || echo 0)
  timeout "$load_limit" "$python" benchmarks/serve_load.py \
    --out "$out/serve_load_batching_$batching.json" --checkpoint "$checkpoint" \
    --device "$device" --sessions "$sessions" --requests "$requests" \
    --batch-window-ms "$window" --timeout $((load_limit - 10)) --threads "$threads" 2>&1 |
    tail -n 30 | tee -a "$log"
done
rm -rf "$(dirname "$checkpoint")"
ls -l "$out" | tee -a "$log"
