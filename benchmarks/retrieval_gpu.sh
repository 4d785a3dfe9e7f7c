#!/usr/bin/env bash
# Passkey retrieval on one H200 (docs/retrieval.md): the memory gate's squashing function
# against the plain fold, trained side by side on one GPU, then evaluated 1K … 16M tokens.
#
#   PYTHONPATH=src bash benchmarks/retrieval_gpu.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]
#
# Each model: the tiny folded model at w = m = 128 on the DESIGN.md §6 passkey with the
# curriculum from 1 to 128 folds (prompts of at most 16K tokens), `foldformer train`; then
# `foldformer eval passkey` one length at a time (all depths and keys of a length in one
# batch), so the short lengths are kept when a long one runs past DEADLINE_S seconds from the
# start. GATES names the models: plain (the note's fold) or a gate_activation.
set -uo pipefail
OUT=${1:?usage: retrieval_gpu.sh RESULTS_DIR [TRAIN_MINUTES] [DEADLINE_S]}
MINUTES=${2:-5}
DEADLINE=$((SECONDS + ${3:-100000}))
LENGTHS=${LENGTHS:-1K 16K 128K 1M 4M 16M}
GATES=${GATES:-sigmoid clamp_st plain}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
ff="python3 -m foldformer.cli"
nvidia-smi -L 2>/dev/null || true

for gate in $GATES; do
  if [ "$gate" = plain ]; then gate_args=(--memory_gate false); else
    gate_args=(--memory_gate true --gate_activation "$gate"); fi
  (
    $ff train --preset tiny --out "$OUT/passkey_$gate" \
      --data "synthetic:passkey?n_folds=1&max_folds=128&mix=0.5&window=256" \
      --d_model 128 --n_layers 2 --n_heads 4 --segment_len 128 --memory_len 128 \
      --seq_len 128 --batch_size 64 --max_minutes "$MINUTES" --max_steps 100000 \
      --warmup_steps 0 --min_lr_ratio 1.0 --weight_decay 0.0 --beta2 0.999 --eval_every 0 \
      --save_every 0 --log_every 25 --progress false --device "$DEVICE" "${gate_args[@]}" \
      > "$OUT/passkey_$gate.train.log" 2>&1
    for length in $LENGTHS; do
      left=$((DEADLINE - SECONDS))
      [ "$left" -gt 5 ] || break
      timeout "$left" $ff eval passkey "$OUT/passkey_$gate/final" --lengths "$length" \
        --samples 20 --batch-size 100 --device "$DEVICE" --out "$OUT/passkey_$gate/eval_$length"
    done > "$OUT/passkey_$gate.eval.log" 2>&1
  ) &
done
wait
echo "done in $SECONDS s"
