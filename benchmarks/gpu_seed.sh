#!/usr/bin/env bash
# The note's set-up on one GPU held to 24 GB: pretrain a model on the pg training authors,
# then measure its effective context length (ECL) on the validation authors.
#
#   bash benchmarks/gpu_seed.sh RESULTS_DIR NAME MINUTES [--key value ...]
#
# NAME names the run; extra options override the `seed` preset (e.g. --memory_len 0 for the
# no-memory baseline, --segment_len 1000000000 --memory_len 0 for full attention).
# PG points at pg.tar.xz (default .carry/pg.tar.xz, where the device copy lives); ECL_MAX is
# the largest ECL distance (default 3072 tokens) and ECL_UNIT its grid unit (default 12, the
# seed preset's w, for every model alike: grid 0, 12, 24, 48, ..., ECL_MAX), ECL_TARGETS its
# target windows (default 512), ECL_BATCH its batch (default 256). The model is saved under RUNS/NAME (default /tmp/runs), tokens
# are cached in TOKEN_CACHE (default /tmp/token_cache).
set -uo pipefail
results=$1 name=$2 minutes=$3
shift 3
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
pg=${PG:-.carry/pg.tar.xz} runs=${RUNS:-/tmp/runs} cache=${TOKEN_CACHE:-/tmp/token_cache}
mkdir -p "$results/$name" "$runs"
python3 -m foldformer.cli train --preset seed --data "$pg?split=train" \
  --val-data "$pg?split=validation" --out "$runs/$name" --max-minutes "$minutes" \
  --memory_fraction 0.17 --progress false --log_every 10 --eval_every 250 --eval_batches 4 \
  --save_every 0 --cache_dir "$cache" "$@" 2>&1 | tee "$results/$name/train.log"
cp "$runs/$name/metrics.jsonl" "$runs/$name/summary.json" \
  "$runs/$name/run_config.json" "$results/$name/" 2>/dev/null
python3 -m foldformer.cli eval ecl "$runs/$name/final" --data "$pg?split=validation" \
  --cache-dir "$cache" --targets "${ECL_TARGETS:-512}" --max-distance "${ECL_MAX:-3072}" \
  --unit "${ECL_UNIT:-12}" --batch-size "${ECL_BATCH:-256}" --control --out "$results/$name" 2>&1 |
  tee "$results/$name/ecl.log"
