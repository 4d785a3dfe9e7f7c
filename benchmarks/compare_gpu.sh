#!/usr/bin/env bash
# The GPU comparison (benchmarks/compare_gpu.toml) split over the GPUs of one machine, then
# gathered into one table:
#
#   bash benchmarks/compare_gpu.sh OUT [CONFIG] [--data SPEC --val-data SPEC ...]
#
# With two or more GPUs, two `foldformer compare` processes train disjoint halves of the model
# list at once (one per GPU, each alone on its GPU, so training times and streaming speeds are
# not disturbed), writing into the same OUT/models/; a last `foldformer compare` over the whole
# list then reuses every finished model (nothing is trained twice) and writes OUT/results.json,
# results.md and the plots. With one GPU it is one plain `foldformer compare`.
# The halves are balanced by the earlier run's training times (docs/results.md).
set -uo pipefail
out=$1
config=${2:-benchmarks/compare_gpu.toml}
shift $(( $# >= 2 ? 2 : 1 ))
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
half_a=${HALF_A:-folded,no_memory,full_attention,rmt}
half_b=${HALF_B:-transformer_xl,peer_infini}
mkdir -p "$out"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
compare=(python3 -m foldformer.cli compare "$config" --out "$out" --no-progress "$@")
if (( gpus >= 2 )); then
  # Both halves read the corpus into the same token cache; a cache is built in a temporary
  # folder and renamed into place, so two builds at once are safe (one is wasted work).
  CUDA_VISIBLE_DEVICES=0 "${compare[@]}" --models "$half_a" > "$out/half_a.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 "${compare[@]}" --models "$half_b" > "$out/half_b.log" 2>&1 &
  wait
  tail -n 5 "$out/half_a.log" "$out/half_b.log"
fi
"${compare[@]}" 2>&1 | tee "$out/compare.log"
