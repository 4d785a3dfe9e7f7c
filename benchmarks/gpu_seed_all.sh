#!/usr/bin/env bash
# The seed set-up and its two reference points, trained side by side on one H200 (three
# processes, each held to 24 GB), then ECL on the validation authors for each:
#   folded      w = m = 12, 128 folds (1,536 tokens) of backpropagation per step
#   no-memory   w = 12, m = 0
#   full        full attention over each 1,536-token step (w = 1536, m = 0)
# Same shape (10.6M non-embedding parameters), data, tokenizer, steps and tokens.
#
#   bash benchmarks/gpu_seed_all.sh RESULTS_DIR [STEPS]
set -uo pipefail
results=$1 steps=${2:-220}
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
common=(--batch_size 512 --seq_len 1536 --max_steps "$steps" --warmup_steps 20)
bash benchmarks/gpu_seed.sh "$results" folded 6.5 "${common[@]}" > "$results/folded.out" 2>&1 &
bash benchmarks/gpu_seed.sh "$results" no_memory 6.5 "${common[@]}" --memory_len 0 > "$results/no_memory.out" 2>&1 &
bash benchmarks/gpu_seed.sh "$results" full_attention 6.5 "${common[@]}" --segment_len 1536 --memory_len 0 > "$results/full_attention.out" 2>&1 &
wait
tail -n 14 "$results"/*/ecl.log
