#!/usr/bin/env bash
# The seed set-up (the note's, DESIGN.md §6) and its two reference points, each held to 24 GB,
# then ECL on the validation authors for each:
#   folded      w = m = 12, 128 folds (1,536 tokens) of backpropagation per step
#   no_memory   w = 12, m = 0
#   full        full attention over each 1,536-token row (w unbounded, m = 0: at evaluation
#               its window grows with the context, like any GPT's)
# Same shape (10.6M non-embedding parameters), byte-level tokens, data, steps, batch and tokens.
#
#   bash benchmarks/gpu_seed_all.sh RESULTS_DIR [STEPS] [MINUTES]
#
# With two or more GPUs the folded run has GPU 0 to itself and the two baselines share GPU 1
# (they cost less per token); with one GPU all three share it (FOLDED_GPU, BASELINE_GPU and
# ONLY="full_attention" etc. change the placement and the set; EXTRA="--key value ..." is added
# to every run, e.g. for a smoke test on a CPU). MINUTES is a guard: a run that
# reaches it stops early (the step count in its summary then shows it) and is still evaluated.
# Learning rate 1e-3 with a 30-step warm-up (1.5e-3 made a BPE folded run blow up early).
set -uo pipefail
results=$1 steps=${2:-180} minutes=${3:-6}
only=${ONLY:-folded no_memory full_attention}  # e.g. ONLY=full_attention; also folded_gate
export PYTHONPATH=src PYTHONUNBUFFERED=1 ECL_MAX=${ECL_MAX:-6144}
pg=${PG:-.carry/pg.tar.xz}
mkdir -p "$results"
# Read the corpus once (the three runs share the token cache).
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
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
baseline_gpu=${BASELINE_GPU:-$(( gpus >= 2 ? 1 : 0 ))}
common=(--batch_size 512 --seq_len 1536 --max_steps "$steps" --warmup_steps 30 --lr 1e-3
        --eval_every $((steps / 4)))
declare -A gpu=([folded]=${FOLDED_GPU:-0} [folded_gate]=${GATE_GPU:-0} [no_memory]=$baseline_gpu
                [full_attention]=$baseline_gpu)
declare -A extra=(
  [folded]=""
  # not the note's set-up: the optional gate mixes the old memory into the new (docs/design.md)
  [folded_gate]="--memory_gate true"
  [no_memory]="--memory_len 0"
  # one attention over the whole row, no per-fold checkpointing: 8 micro-batches fit 24 GB
  [full_attention]="--segment_len 1000000000 --memory_len 0 --grad_accum 8"
)
for name in $only; do
  # shellcheck disable=SC2086  # extra options are word lists
  CUDA_VISIBLE_DEVICES=${gpu[$name]} bash benchmarks/gpu_seed.sh "$results" "$name" "$minutes" \
    "${common[@]}" ${extra[$name]} ${EXTRA:-} > "$results/$name.out" 2>&1 &
done
wait
for name in $only; do
  echo "== $name"; tail -n 3 "$results/$name/train.log"; tail -n 4 "$results/$name/ecl.log"
done
