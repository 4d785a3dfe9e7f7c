#!/usr/bin/env bash
# The seed set-up and its two reference points, trained side by side on one H200 (three
# processes, each held to 24 GB), then ECL on the validation authors for each:
#   folded      w = m = 12, 128 folds (1,536 tokens) of backpropagation per step
#   no-memory   w = 12, m = 0
#   full        full attention over each 1,536-token step (w = 1536, m = 0)
# Same shape (10.6M non-embedding parameters), data, tokenizer, steps and tokens.
#
#   bash benchmarks/gpu_seed_all.sh RESULTS_DIR [STEPS] [MINUTES]
#
# Learning rate 1e-3 with a 40-step warm-up: at 1.5e-3 after 20 steps the folded model's
# loss blew up early (10.9 nats at step 20, worse than uniform) and never caught up.
set -uo pipefail
results=$1 steps=${2:-110} minutes=${3:-6}
export PYTHONPATH=src PYTHONUNBUFFERED=1
pg=${PG:-.carry/pg.tar.xz}
mkdir -p "$results"
# Tokenize once (the three runs share the cache).
python3 - "$pg" <<'PY'
import sys
from foldformer.data.cache import tokenize_corpus
from foldformer.data.tokenizers import load_tokenizer
from foldformer.train import PRESETS
tok = load_tokenizer(PRESETS["seed"]["data"]["tokenizer"])
for split in ("train", "validation"):
    c = tokenize_corpus([f"{sys.argv[1]}?split={split}"], tok, "/tmp/token_cache", progress=False)
    print(split, len(c), "tokens", flush=True)
PY
common=(--batch_size 512 --seq_len 1536 --max_steps "$steps" --warmup_steps 40 --lr 1e-3
        --eval_every $((steps / 2)) --eval_batches 4)
bash benchmarks/gpu_seed.sh "$results" folded "$minutes" "${common[@]}" > "$results/folded.out" 2>&1 &
bash benchmarks/gpu_seed.sh "$results" no_memory "$minutes" "${common[@]}" --memory_len 0 \
  > "$results/no_memory.out" 2>&1 &
# one 1,536-token fold per step: no per-fold checkpointing to save memory, so 4 micro-batches
bash benchmarks/gpu_seed.sh "$results" full_attention "$minutes" "${common[@]}" --segment_len 1536 \
  --memory_len 0 --grad_accum 4 > "$results/full_attention.out" 2>&1 &
wait
tail -n 14 "$results"/*/ecl.log
