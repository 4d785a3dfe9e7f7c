#!/bin/bash
# Call B (issue 13): round 8's BABILong recipe on qa2 and qa4, folded, RMT and no-memory (matched).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
O=/tmp/outB; mkdir -p $O
python3 benchmarks/babilong_gpu.py --pg .carry/pg_small.tar.xz --babi .carry/babi/en-10k --out $O/qa2_qa4 \
  --tasks qa2,qa4 --minutes 7 --deadline 555 --max-train-tokens 8192 --keep-models \
  --data-options 'uniform=true&straddle=0.5&permute=true' > $O/run.log 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
tail -n 12 $O/run.log
tar czf $OUT/callB.tar.gz -C $O .
