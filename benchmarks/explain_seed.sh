#!/usr/bin/env bash
# Issue 16, item 4, on the `seed` models: context horizon (foldformer.explain) against ECL.
# On one GPU: train the seed-preset folded model and the same with --memory_gate true
# (seed_round4's folded and folded_gate, through gpu_seed_all.sh: both at once on the one GPU,
# one token cache), measure their ECL as seed_round4 did (gpu_seed.sh: 512 targets, the control,
# grid 0, 12, 24, ..., ECL_MAX = 6144 bytes), then explain 8 of the window's predictions (heads
# averaged) of up to TARGETS windows CONTEXT (8192) bytes into validation documents for each (the
# gate carried per channel, exact, and by its channel mean), and write OUT/explain_seed.json,
# OUT/explain_seed.png, OUT/explain_seed.log, OUT/runs.tar.gz (logs, metrics, ecl.json, parts;
# no checkpoints). benchmarks/explain_seed.py says what is measured.
#
#   PYTHONPATH=src bash benchmarks/explain_seed.sh OUT PG_ARCHIVE
#
# Wall clock on an H200, about: 10 s tokenising, MINUTES (3) of training each plus ~30 s
# start-up and saving, ~1 min of ECL, EXPLAIN_S (70) of explaining plus ~15 s loading: ~6.5 min
# (TOTAL_S, 400, shortens the explaining if the rest ran late).
# STEPS (80) is the cosine schedule's length, MINUTES its guard (two runs sharing a GPU step at
# about half the speed of one: seed_round4 took 0.95 s a step alone). SMOKE=1: a toy model on
# the CPU through every stage (under a minute). WORK (default: a new /tmp/explain_seed.*) holds
# the runs and the models. `python3` must be the Python with torch (as for gpu_seed_all.sh).
set -euo pipefail
[[ $# == 2 ]] || { echo "usage: bash benchmarks/explain_seed.sh OUT PG_ARCHIVE" >&2; exit 2; }
out=$1 pg=$2
[[ -f $pg ]] || { echo "no pg archive at $pg" >&2; exit 2; }
work=${WORK:-$(mktemp -d /tmp/explain_seed.XXXXXX)}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" "$work/parts"
exec > >(tee "$out/explain_seed.log") 2>&1
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1 PG=$pg RUNS=$work/models
export TOKEN_CACHE=$work/token_cache ONLY="folded folded_gate" FOLDED_GPU=0 GATE_GPU=0
if [[ ${SMOKE:-0} == 1 ]]; then
  steps=${STEPS:-4} minutes=${MINUTES:-1} context=${CONTEXT:-96} targets=${TARGETS:-2}
  export ECL_MAX=${ECL_MAX:-48} ECL_TARGETS=${ECL_TARGETS:-16} OMP_NUM_THREADS=1
  threads=1
  export EXTRA="--device cpu --compile false --d_model 32 --n_layers 2 --n_heads 2
    --batch_size 4 --seq_len 48 --eval_batches 1"
else
  steps=${STEPS:-80} minutes=${MINUTES:-3} context=${CONTEXT:-8192} targets=${TARGETS:-48}
  export ECL_MAX=${ECL_MAX:-6144}
  threads=4  # CPU threads of each explaining process
fi
commands=("PG=$pg ONLY='$ONLY' FOLDED_GPU=0 GATE_GPU=0 ECL_MAX=$ECL_MAX EXTRA='${EXTRA:-}' \
bash benchmarks/gpu_seed_all.sh $work/runs $steps $minutes")
echo "$(date -u +%T) train both, then ECL: ${commands[0]}"
bash "$here/gpu_seed_all.sh" "$work/runs" "$steps" "$minutes" || echo "a run failed (above)"
# explaining gets EXPLAIN_S (70) or what is left of TOTAL_S (400) after ~40 s for loading,
# the last target and the report, whichever is less (10 s at least)
left=$(( ${TOTAL_S:-400} - SECONDS - 40 )) budget=${EXPLAIN_S:-70}
budget=$(( left < budget ? (left > 10 ? left : 10) : budget ))
echo "$(date -u +%T) explain (${SECONDS} s so far; up to $budget s of targets per process)"
pids=() parts=()
for spec in folded:mean folded_gate:channels folded_gate:mean; do
  name=${spec%:*} gate=${spec#*:} part=$work/parts/${spec/:/.}.json
  args=(measure "$RUNS/$name/final" --name "$name" --gate "$gate" --data "$pg?split=validation"
        --ecl "$work/runs/$name/ecl.json" --run "$work/runs/$name" --context "$context"
        --targets "$targets" --budget-s "$budget" --cache-dir "$TOKEN_CACHE" --out "$part")
  commands+=("python benchmarks/explain_seed.py ${args[*]}")
  OMP_NUM_THREADS=$threads python3 "$here/explain_seed.py" "${args[@]}" &
  pids+=($!) parts+=("$part")
done
done_parts=()
for i in "${!pids[@]}"; do  # a failed part is left out of the report, not the others
  if wait "${pids[$i]}"; then done_parts+=("${parts[$i]}"); else echo "FAILED: ${parts[$i]}"; fi
done
tar -czf "$out/runs.tar.gz" -C "$work" runs parts
(( ${#done_parts[@]} )) || { echo "no model was explained (above)"; exit 1; }
echo "$(date -u +%T) report"
report=()
for command in "${commands[@]}"; do report+=(--command "$command"); done
python3 "$here/explain_seed.py" report "$out" "${done_parts[@]}" "${report[@]}"
echo "$(date -u +%T) done: $(ls "$out" | tr '\n' ' ')"
