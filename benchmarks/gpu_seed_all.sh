#!/usr/bin/env bash
# The seed set-up (the note's, DESIGN.md §6) and its reference points, each held to 24 GB,
# then ECL (with the unrelated-context control) on the validation authors for each:
#   folded       w = m = 12, 64 folds (768 tokens) of backpropagation per step
#   folded_gate  the same with the optional memory gate (not the note's set-up)
#   no_memory    w = 12, m = 0
#   full         full attention over each 768-token row (w unbounded, m = 0: at evaluation
#                its window grows with the context, like any GPT's)
# Same shape (10.6M non-embedding parameters; the gate adds 0.3M), byte-level tokens, data,
# steps, batch (1024 rows x 768 bytes) and tokens.
#
#   bash benchmarks/gpu_seed_all.sh RESULTS_DIR [STEPS] [MINUTES]
#
# Placement: folded on FOLDED_GPU, folded_gate on GATE_GPU, the baselines on BASELINE_GPU or
# each on NO_MEMORY_GPU / FULL_GPU (defaults: folded and the gate on GPU 0, the baselines on
# GPU 1 when there are two; runs sharing a GPU slow each other down and may hit MINUTES). ONLY="folded folded_gate" etc. picks the runs;
# EXTRA="--key value ..." is added to every run (e.g. EXTRA="--batch_size 512 --seq_len 1536"
# for round 3's shape, or a smoke test on a CPU). MINUTES is a guard: a run that reaches it
# stops early (the step count in its summary then shows it) and is still evaluated.
# Why 1024 x 768: a 24-position fold takes about the same time for 256 to 1024 rows (launch
# and latency bound, benchmarks/seed_step.py), so wide rows are free and the folds per step set
# the optimizer steps an hour gives; round 3 (512 x 1536, 180 steps) was undertrained.
# Learning rate 1e-3 with a 30-step warm-up (1.5e-3 made a BPE folded run blow up early).
set -uo pipefail
results=$1 steps=${2:-360} minutes=${3:-6.6}
only=${ONLY:-folded no_memory full_attention}  # e.g. ONLY=full_attention; also folded_gate
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 ECL_MAX=${ECL_MAX:-6144}
pg=${PG:-.carry/pg.tar.xz}
mkdir -p "$results"
# Read the corpus once (the three runs share the token cache).
python3 - "$pg" "${TOKEN_CACHE:-/tmp/token_cache}" <<'PY'
import sys
from foldformer.data.cache import tokenize_corpus
from foldformer.data.tokenizers import load_tokenizer
from foldformer.train import PRESETS
tok = load_tokenizer(PRESETS["seed"]["data"]["tokenizer"])
for split in ("train", "validation"):
    c = tokenize_corpus([f"{sys.argv[1]}?split={split}"], tok, sys.argv[2], progress=False)
    print(split, len(c), "tokens", flush=True)
PY
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
baseline_gpu=${BASELINE_GPU:-$(( gpus >= 2 ? 1 : 0 ))}
common=(--batch_size 1024 --seq_len 768 --max_steps "$steps" --warmup_steps 30 --lr 1e-3
        --eval_every $((steps / 4)))
declare -A gpu=([folded]=${FOLDED_GPU:-0} [folded_gate]=${GATE_GPU:-0}
                [no_memory]=${NO_MEMORY_GPU:-$baseline_gpu} [full_attention]=${FULL_GPU:-$baseline_gpu})
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
