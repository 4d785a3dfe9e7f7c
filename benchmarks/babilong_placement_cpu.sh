#!/bin/bash
# Where BABILong qa1 is lost (issue 13, CPU): round 8's folded qa1 model with the facts only in
# the first or the last 1K tokens of background at 16K tokens, and only in the first 8K tokens
# at 64K and 256K (as round 10's 1M cell on the GPU); the same 100 held-out questions in every
# cell (seed 0). On 2 cores: about 1.2 minutes a 16K cell, 3.2 minutes at 64K, 12.3 at 256K.
#   bash benchmarks/babilong_placement_cpu.sh PG_ARCHIVE BABI_DIR OUT
set -euo pipefail
PG=$1 BABI=$2 OUT=$3
M=benchmarks/results/h200/babilong/round8/models/folded_continued
for cell in "16K start 1K" "16K end 1K" "64K start 8K" "256K start 8K"; do
  set -- $cell
  facts=(--facts-within "$3" --facts-at "$2")
  .venv/bin/foldformer eval babilong $M --task qa1 --lengths "$1" --books "$PG?split=validation" \
    --babi "$BABI" --samples 100 --batch-size 100 --exact "${facts[@]}" --device cpu \
    --out "$OUT/$2$1_within$3"
done
