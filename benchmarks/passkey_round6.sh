#!/usr/bin/env bash
# Round 6 of the H200 passkey runs (docs/retrieval.md): the FIFO lever on the passkey. The only
# lever with no miss in the CPU key-recall ablation (benchmarks/results/cpu_retention/levers/:
# memory_fifo with m = 2w, clamp_st, 100% to 1,024x on both seeds) is tried on round 5's model:
# the same 128 memory rows (so its weights load as they are, learned initial memory included)
# now hold the final states of the last two 64-token segments (w = 64, memory_fifo), trained
# with round 5's mixed curriculum from 2 folds (a prompt takes at least 97 tokens) to 256 (at
# most 16K tokens), then the grid with the CUDA-graph ingest until DEADLINE_S and the
# per-level accuracy.
#
#   PYTHONPATH=src bash benchmarks/passkey_round6.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]
#   DEVICE=cpu SAMPLES=1 LENGTHS=1K ...   # a toy run on a CPU (tests/test_eval_passkey.py)
set -uo pipefail
R=${1:?usage: passkey_round6.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]}
MINUTES=${2:-3}
DEADLINE=${3:-420}
INIT=${INIT:-.carry/round5/final}
DEVICE=${DEVICE:-cuda}
mkdir -p "$R"
spec="synthetic:passkey?n_folds=2&max_folds=256&mix=0.5&window=256&threshold=0.9"
compile=$([[ $DEVICE == cuda ]] && echo true || echo false)
timeout $((DEADLINE + 40)) python3 benchmarks/passkey_gpu.py --out "$R/fifo" --init "$INIT" \
  --minutes "$MINUTES" --deadline "$DEADLINE" --lengths "${LENGTHS:-1K,16K,128K,1M}" \
  --samples "${SAMPLES:-20}" --device "$DEVICE" --set "data.train=$spec" \
  --set train.compile=$compile --set model.segment_len=64 --set train.seq_len=64 \
  --set model.memory_fifo=true > "$R/fifo.log" 2>&1 || { tail -n 20 "$R/fifo.log"; exit 1; }
python3 benchmarks/passkey_levels.py "$R/fifo/run/final" --levels "${LEVELS:-4,16,64,128,256}" \
  --samples "${SAMPLES:-64}" --device "$DEVICE" --out "$R/levels.json" >> "$R/fifo.log" 2>&1
echo "done in $SECONDS s"
tail -n 12 "$R/fifo.log"
