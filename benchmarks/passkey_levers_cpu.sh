#!/usr/bin/env bash
# Round 7's data options from scratch on a CPU, against the plain curriculum, at the same
# budget and two seeds (docs/retrieval.md, "Round 7 … on a CPU"). A small model (d = 64,
# w = m = 32, the passkey preset otherwise) trains MINUTES per run, two runs at a time on one
# thread each; then `foldformer eval passkey` at 1x, 4x, 16x and 64x the longest training
# prompt (MAX_FOLDS * 32 tokens), 10 keys a cell, depths 0 / 0.5 / 1.
#
#   bash benchmarks/passkey_levers_cpu.sh RESULTS_DIR [MINUTES] [MAX_FOLDS]
#   SEEDS="0" ARMS="levers" LENGTHS=512 ...   # other runs; ARMS from plain, uniform,
#                                             # uniform_shuffle, levers (all three options)
set -euo pipefail
R=${1:?usage: passkey_levers_cpu.sh RESULTS_DIR [MINUTES] [MAX_FOLDS]}
MINUTES=${2:-15}
MAX_FOLDS=${3:-64}
SEEDS=${SEEDS:-0 1}
ARMS=${ARMS:-plain levers}
W=32
LONGEST=$((MAX_FOLDS * W))
LENGTHS=${LENGTHS:-$LONGEST,$((4 * LONGEST)),$((16 * LONGEST)),$((64 * LONGEST))}
FF=${FOLDFORMER:-foldformer}
mkdir -p "$R"
spec() {  # ARM
  local base="synthetic:passkey?max_folds=$MAX_FOLDS&mix=0.5&window=256"
  case $1 in
    plain) echo "$base" ;;
    uniform) echo "$base&uniform=true" ;;
    uniform_shuffle) echo "$base&uniform=true&shuffle=true" ;;
    levers) echo "$base&uniform=true&shuffle=true&straddle=0.5" ;;
    *) echo "unknown arm $1" >&2; return 1 ;;
  esac
}
train() {  # ARM SEED
  OMP_NUM_THREADS=1 "$FF" train --preset passkey --d_model 64 --segment_len $W --memory_len $W \
    --seq_len $W --batch_size 32 --max_minutes "$MINUTES" --seed "$2" --device cpu \
    --progress false --log_every 50 --data "$(spec "$1")" --out "$R/$1_seed$2" \
    > "$R/$1_seed$2.log" 2>&1
}
runs=()
for seed in $SEEDS; do for arm in $ARMS; do runs+=("$arm $seed"); done; done
for ((i = 0; i < ${#runs[@]}; i += 2)); do  # two at a time: one per core
  train ${runs[i]} &
  if ((i + 1 < ${#runs[@]})); then train ${runs[i + 1]} & fi
  wait
done
for run in "${runs[@]}"; do
  set -- $run
  OMP_NUM_THREADS=2 "$FF" eval passkey "$R/$1_seed$2/final" --lengths "$LENGTHS" \
    --depths 0,0.5,1 --samples "${SAMPLES:-10}" --device cpu --out "$R/$1_seed$2/eval" \
    >> "$R/$1_seed$2.log" 2>&1
done
echo "done in $SECONDS s"
