#!/bin/bash
# Where BABILong qa1 is lost (issue 13, CPU): round 8's folded qa1 model with the facts only in
# the first or the last 1K tokens of background, at 16K and 64K tokens; the same
# 100 held-out questions in every cell (seed 0). About 1.2 minutes a 16K cell on 2 cores; a 64K cell
# did not finish in 9 minutes (2026-12-07), so the 64K cells have no result yet.
#   bash benchmarks/babilong_placement_cpu.sh PG_ARCHIVE BABI_DIR OUT
set -euo pipefail
PG=$1 BABI=$2 OUT=$3
M=benchmarks/results/h200/babilong/round8/models/folded_continued
for cell in "16K start" "16K end" "64K start" "64K end"; do
  set -- $cell
  facts=(); [ "$2" = anywhere ] || facts=(--facts-within 1K --facts-at "$2")
  .venv/bin/foldformer eval babilong $M --task qa1 --lengths "$1" --books "$PG?split=validation" \
    --babi "$BABI" --samples 100 --batch-size 100 --exact "${facts[@]}" --device cpu \
    --out "$OUT/$2$1"
done
