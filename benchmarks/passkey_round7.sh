#!/usr/bin/env bash
# Round 7 of the H200 passkey runs (docs/retrieval.md): the three data levers of the CPU
# fine-tunes (stage3_shuffle, stage4_straddle) on the GPU. Every row's filler is shuffled
# (shuffle=true: the state is not a function of the fold count), a mixed-in batch has any number
# of folds up to the current level (uniform=true), and half the rows are shortened until the
# answer crosses a fold boundary (straddle=0.5), as the §6 1M and 16M prompts' answers do.
# Two runs share the GPU (the tiny model leaves most of it idle):
#   scratch   the RECIPE of passkey_gpu.py from random weights, curriculum 1 -> 128 folds
#   round5    round 5's model fine-tuned, curriculum 16 -> 128 folds (threshold 0.9)
# Both train on prompts of at most 128 folds, 16K tokens (the §6 condition).
# Each then evaluates the §6 grid with the CUDA-graph ingest until DEADLINE_S, and the
# per-level accuracy on the training distribution.
#
#   PYTHONPATH=src bash benchmarks/passkey_round7.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]
#   DEVICE=cpu SAMPLES=1 LENGTHS=1K ...   # a toy run on a CPU
#   INIT=DIR SCRATCH_INIT=DIR             # continue both runs from earlier ones
set -uo pipefail
R=${1:?usage: passkey_round7.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]}
MINUTES=${2:-5}
DEADLINE=${3:-480}
INIT=${INIT:-benchmarks/results/h200/retrieval/round5/clamp_st_mixed/final}
DEVICE=${DEVICE:-cuda}
mkdir -p "$R"
levers="mix=0.5&window=256&uniform=true&shuffle=true&straddle=0.5"
compile=$([[ $DEVICE == cuda ]] && echo true || echo false)
run() {  # NAME SPEC [--init DIR]
  local name=$1 spec=$2
  shift 2
  timeout "${TIMEOUT:-$((DEADLINE + 40))}" python3 benchmarks/passkey_gpu.py --out "$R/$name" "$@" \
    --minutes "$MINUTES" --deadline "$DEADLINE" --lengths "${LENGTHS:-1K,16K,128K,1M}" \
    --samples "${SAMPLES:-20}" --device "$DEVICE" --set "data.train=$spec" \
    --set train.compile=$compile > "$R/$name.log" 2>&1 || { tail -n 20 "$R/$name.log"; return 1; }
  python3 benchmarks/passkey_levels.py "$R/$name/run/final" --levels "${LEVELS:-4,16,64,128,256}" \
    --samples "${SAMPLES:-64}" --device "$DEVICE" --out "$R/$name/levels.json" >> "$R/$name.log" 2>&1
}
run scratch "synthetic:passkey?n_folds=${SCRATCH_FOLDS:-1}&max_folds=128&$levers" ${SCRATCH_INIT:+--init "$SCRATCH_INIT"} &
run round5 "synthetic:passkey?n_folds=16&max_folds=128&threshold=0.9&$levers" --init "$INIT" &
wait
echo "done in $SECONDS s"
for name in scratch round5; do echo "== $name"; tail -n 12 "$R/$name.log"; done
