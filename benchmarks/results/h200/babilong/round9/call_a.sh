#!/bin/bash
# Call A (issue 13): qa1 push (round 8's folded model, 6 min more, compiled, 16K curriculum),
# the kept folded and no-memory models at 10M, and a smoke test of RMT's compiled step on a GPU.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=benchmarks/results/h200/babilong/round8/models
T=/tmp/T; mkdir -p $T/folded_qa1 $T/no_memory_qa1
cp -r $R/folded_continued $T/folded_qa1/model; cp -r $R/no_memory $T/no_memory_qa1/model
C="--pg .carry/pg_small.tar.xz --babi .carry/babi/en-10k"
D='uniform=true&straddle=0.5&permute=true'
O=/tmp/outA; mkdir -p $O
python3 benchmarks/babilong_gpu.py $C --out $O/cont --work /tmp/w1 --models folded_init --init $R/folded_continued \
  --tasks qa1 --minutes 6 --deadline 480 --max-train-tokens 16384 --keep-models --data-options "$D" \
  --set train.compile=true > $O/cont.log 2>&1 &
python3 benchmarks/babilong_gpu.py $C --out $O/long --work /tmp/w2 --models folded,no_memory --tasks qa1 \
  --lengths 10M --samples 100 --deadline 480 --trained $T > $O/long.log 2>&1 &
python3 benchmarks/babilong_gpu.py $C --out $O/rmtc --work /tmp/w3 --models rmt --tasks qa2 --minutes 1 \
  --lengths 0,4K --deadline 200 --max-train-tokens 8192 --data-options "$D" --set train.compile=true > $O/rmtc.log 2>&1 &
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
tail -12 $O/*.log
tar czf $OUT/callA.tar.gz -C $O .
