#!/bin/bash
# Round 10, call A (issue 13): where qa1 is lost at 1M and 10M (the facts only in the last or
# the first 8K tokens of background, --facts-within), the missing cells of round 9 (qa5 at 1M,
# qa4 at 10M), and round 8's folded qa1 model 6 minutes more at 8K, compiled.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R8=benchmarks/results/h200/babilong/round8/models
R9=benchmarks/results/h200/babilong/round9/models
T=/tmp/T; mkdir -p $T/folded_qa1 $T/folded_qa5 $T/rmt_qa5 $T/folded_qa4
cp -r $R8/folded_continued $T/folded_qa1/model
cp -r $R9/qa5_folded $T/folded_qa5/model; cp -r $R9/qa5_rmt $T/rmt_qa5/model
cp -r $R9/qa4_threshold07_folded $T/folded_qa4/model
C="--pg .carry/pg_small.tar.xz --babi .carry/babi/en-10k --deadline 520 --samples 100"
D='uniform=true&straddle=0.5&permute=true'
O=/tmp/outA; mkdir -p $O
B=benchmarks/babilong_gpu.py
python3 $B $C --out $O/cont --work /tmp/w1 --models folded_init --init $R8/folded_continued \
  --tasks qa1 --minutes 6 --max-train-tokens 8192 --keep-models --data-options "$D" \
  --set train.compile=true > $O/cont.log 2>&1 &
python3 $B $C --out $O/end10m --work /tmp/w2 --models folded --tasks qa1 --trained $T \
  --lengths 10M --facts-within 8K --facts-at end > $O/end10m.log 2>&1 &
python3 $B $C --out $O/end1m --work /tmp/w3 --models folded --tasks qa1 --trained $T \
  --lengths 1M --facts-within 8K --facts-at end > $O/end1m.log 2>&1 &
python3 $B $C --out $O/start1m --work /tmp/w4 --models folded --tasks qa1 --trained $T \
  --lengths 1M --facts-within 8K --facts-at start > $O/start1m.log 2>&1 &
python3 $B $C --out $O/qa5 --work /tmp/w5 --models folded,rmt --tasks qa5 --trained $T \
  --lengths 1M > $O/qa5.log 2>&1 &
python3 $B $C --out $O/qa4 --work /tmp/w6 --models folded --tasks qa4 --trained $T \
  --lengths 10M > $O/qa4.log 2>&1 &
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
tail -n 6 $O/*.log
tar czf $OUT/callA.tar.gz -C $O .
