#!/usr/bin/env bash
# Does the folded memory carry what the text says, or only warm up? The tiny preset (d 64,
# 2 layers, w = m = 8, byte-level) trained on four books with and without the optional memory
# gate, then ECL on two held-out books with the unrelated-context control (docs/evaluation.md).
# 2 min 36 s on 2 CPU cores (both runs at once, one thread each; 2026-11-29).
#
#   bash benchmarks/cpu_gate_control.sh OUT [BOOKS_DIR]     # BOOKS_DIR: ../shared/data/books
set -euo pipefail
out=$1
books=${2:-../shared/data/books}
foldformer=${FOLDFORMER:-foldformer}
export OMP_NUM_THREADS=1
for gate in false true; do
  (
    $foldformer train --preset tiny --memory_gate $gate \
      --data "$books"/pg1342.txt "$books"/pg84.txt "$books"/pg4715.txt "$books"/pg1695.txt \
      --val-data "$books"/pg35.txt "$books"/pg2500.txt --max-steps 600 --seq_len 256 \
      --batch_size 16 --eval_every 300 --progress false --device cpu --out "$out/gate_$gate"
    $foldformer eval ecl "$out/gate_$gate/final" --data "$books"/pg35.txt "$books"/pg2500.txt \
      --targets 200 --max-distance 1024 --device cpu --control --out "$out/gate_$gate"
  ) > "$out.gate_$gate.log" 2>&1 &
done
wait
for gate in false true; do echo "== memory_gate=$gate"; grep -E "^ *[0-9]+ +[0-9.]+ |^ECL" "$out.gate_$gate.log"; done
