#!/bin/bash
# Issue 13 item 5: the seed set-up (w = m = 12, byte-level, pg training authors) with the gate
# that can hold exactly (clamp_st, the passkey preset's), ECL on the validation authors with
# the grid 0, 16, 32, ... 65536 bytes and the unrelated-context control. Each process held to
# 24 GB, as in round 4, whatever the card's size. Train and evaluate in one call (the model,
# 43 MB, does not come back): a 5.5-minute guard on training (round 4 trained 6.5; the ECL to
# 65536 needs the rest of the call), then ECL with 512 targets. A shorter call: MINUTES (the
# guard), ECL_TARGETS and LIMIT (seconds for the whole run) override 5.5, 512 and 560.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
frac=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 |
       awk '{printf "%.3f", 24 * 1024 / $1}')
O=/tmp/outB; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
echo "memory_fraction $frac" >> $O/gpu.txt
ONLY=folded_gate GATE_GPU=0 ECL_TARGETS=${ECL_TARGETS:-512} ECL_MAX=65536 ECL_UNIT=16 ECL_BATCH=512 PG=.carry/pg.tar.xz \
  EXTRA="--gate_activation clamp_st --memory_fraction $frac" \
  timeout ${LIMIT:-560} bash benchmarks/gpu_seed_all.sh $O 360 ${MINUTES:-5.5} > $O/all.log 2>&1
echo "rc=$?" >> $O/all.log
tail -n 25 $O/folded_gate/ecl.log $O/folded_gate/train.log 2>/dev/null | cut -c1-300
tar czf $OUT/callB.tar.gz -C $O .
