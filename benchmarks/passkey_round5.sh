#!/usr/bin/env bash
# Round 5 of the H200 passkey runs (docs/retrieval.md): round 3's clamp_st model continued with
# the curriculum from 1 fold to 128 (prompts of at most 16K tokens), every lower level kept in
# the mix — round 4 started at 16 folds and forgot the short prompts. Then the grid with the
# CUDA-graph ingest until DEADLINE_S.
#
#   PYTHONPATH=src bash benchmarks/passkey_round5.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]
set -uo pipefail
R=${1:?usage: passkey_round5.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]}
MINUTES=${2:-4}
DEADLINE=${3:-450}
INIT=${INIT:-.carry/round3}
mkdir -p "$R"
spec="synthetic:passkey?n_folds=1&max_folds=128&mix=0.5&window=256&threshold=0.9"
timeout $((DEADLINE + 40)) python3 benchmarks/passkey_gpu.py --out "$R/clamp_st_mixed" \
  --init "$INIT/passkey_clamp_st/final" --minutes "$MINUTES" --deadline "$DEADLINE" \
  --lengths 1K,16K,128K,1M --set "data.train=$spec" --set train.compile=true \
  > "$R/clamp_st_mixed.log" 2>&1
python3 benchmarks/passkey_levels.py "$R/clamp_st_mixed/run/final" --levels 4,8,16,32,64,128 \
  --samples 64 --device cuda --out "$R/levels.json" >> "$R/clamp_st_mixed.log" 2>&1
echo "done in $SECONDS s"
