#!/usr/bin/env bash
# Round 4 of the H200 passkey runs (docs/retrieval.md): three models continued from round 3's
# weights (.carry/round3, trained to 2K-token prompts) with the curriculum from 16 to 128 folds
# (prompts of at most 16K tokens), side by side on one GPU, then the grid 1K … 16M with the
# CUDA-graph ingest; and the CUDA-graph ingest checked against the eager one.
#
#   PYTHONPATH=src bash benchmarks/passkey_round4.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]
set -uo pipefail
R=${1:?usage: passkey_round4.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]}
MINUTES=${2:-4.5}
DEADLINE=${3:-500}
INIT=${INIT:-.carry/round3}
mkdir -p "$R"
nvidia-smi -L 2>/dev/null || true
spec="synthetic:passkey?n_folds=16&max_folds=128&mix=0.5&window=256&threshold=0.9"
common=(--minutes "$MINUTES" --deadline "$DEADLINE" --lengths 1K,16K,128K,1M,4M,16M
        --set "data.train=$spec" --set train.compile=true)
py=(timeout $((DEADLINE + 40)) python3 benchmarks/passkey_gpu.py)
python3 benchmarks/passkey_gpu.py --check-graph "$INIT/passkey_clamp_st/final" --out "$R/graph" \
  --lengths 16K,128K > "$R/graph.log" 2>&1 &
"${py[@]}" --out "$R/clamp_st" --init "$INIT/passkey_clamp_st/final" "${common[@]}" \
  > "$R/clamp_st.log" 2>&1 &
# the sigmoid model's weights, now with a gate that can hold exactly
"${py[@]}" --out "$R/sigmoid_to_clamp_st" --init "$INIT/passkey_sigmoid/final" "${common[@]}" \
  > "$R/sigmoid_to_clamp_st.log" 2>&1 &
"${py[@]}" --out "$R/sigmoid" --init "$INIT/passkey_sigmoid/final" "${common[@]}" \
  --set model.gate_activation=sigmoid > "$R/sigmoid.log" 2>&1 &
wait
echo "done in $SECONDS s"
