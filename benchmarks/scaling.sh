#!/usr/bin/env bash
# Weak scaling of training under torchrun: the `seed` preset (byte-level, w = m = 12) at
# 512 rows x 1536 tokens per GPU (128 folds a step, per-fold checkpointing) on 1, 2
# and, when more are visible, all GPUs; then FSDP (`--fsdp true`) on 2 GPUs as one extra row.
# Every run is `foldformer train` under torchrun (DDP across ranks, a plain process at 1), its
# tokens/s read from metrics.jsonl.
#
#   bash benchmarks/scaling.sh [OUT.json] [DATA_SPEC] [--key value ...]   # GPUs
#   bash benchmarks/scaling.sh OUT.json --quick                            # CPU smoke test
#
# OUT.json defaults to benchmarks/results/h200/scaling.json, DATA_SPEC to
# '.carry/pg.tar.xz?split=train'; trailing --key value pairs go to every `train` command
# (e.g. --batch_size 256 --seq_len 768). Rows: tokens/s (global), tokens/s per GPU, scaling
# efficiency = (tokens/s per GPU at N) / (tokens/s at 1 GPU); scaling.py says how they are read.
#
# Compile: on (the preset's setting). Eager, the 12-token fold runs at about half the speed
# (Python and launch bound), which would hide the all-reduce behind a slow step and overstate
# the efficiency of the training we actually run. The price is the compile warm-up in each
# run's first logged interval, which is skipped: 30-60 s cold, less when inductor's on-disk
# cache already holds the fold (runs after the first, or after benchmarks/throughput.py, whose
# 512 x 1536 seed row compiles the same fold). 15 steps, a log every 5: 2 measured intervals.
#
# Time: SCALING_BUDGET seconds in all (default 150; quick 120). A run is cut at
# min(SCALING_RUN_CAP (default 90), what is left) and one that would start too late is
# recorded as skipped; the JSON is rewritten after every run, so a cut run loses nothing else
# (a run cut after two logged intervals still has a measurement). SCALING_FSDP=0 leaves the
# FSDP row out.
set -uo pipefail

quick=0
positional=()
extra=()
for arg in "$@"; do
  if [[ $arg == --quick ]]; then
    quick=1
  elif ((${#extra[@]} == 0)) && [[ $arg != --* ]]; then
    positional+=("$arg")
  else
    extra+=("$arg")
  fi
done
out=${positional[0]:-benchmarks/results/h200/scaling.json}
data=${positional[1]:-.carry/pg.tar.xz?split=train}

here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-$(command -v python3 || command -v python)}
# NVLink multicast stays off (the device machines require it; NCCL does not need it here).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
helper="$here/scaling.py"
SECONDS=0
budget=${SCALING_BUDGET:-150}
cap=${SCALING_RUN_CAP:-90}
work=${SCALING_WORK:-$(mktemp -d /tmp/scaling.XXXXXX)}
runs=$work/runs
kept=${out%.json}_runs  # each run's log and metrics.jsonl, beside the JSON
mkdir -p "$runs" "$kept"

if ((quick)); then
  # CPU processes with gloo, a tiny model, a generated corpus: proves the script end to end.
  budget=${SCALING_BUDGET:-120}
  export OMP_NUM_THREADS=1
  if ((${#positional[@]} < 2)); then
    data=$work/corpus.txt
    "$python" -c "import random, sys; r = random.Random(0); w = 'the a fold of memory reads stream token window'.split(); open(sys.argv[1], 'w').write(' '.join(r.choice(w) for _ in range(40000)))" "$data"
  fi
  cache=$work/token_cache
  counts=(1 2)
  common=(--preset seed --tokenizer bytes --device cpu --compile false --d_model 32
    --n_layers 2 --n_heads 4 --segment_len 8 --memory_len 8 --seq_len 32 --batch_size 4
    --max-steps 6 --log_every 2)
else
  cache=/tmp/token_cache
  gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
  if ((gpus < 1)); then
    echo "scaling.sh: no GPU visible (torch.cuda.device_count() = 0); use --quick on a CPU" >&2
    exit 2
  fi
  counts=(1)
  ((gpus >= 2)) && counts+=(2)
  ((gpus > 2)) && counts+=("$gpus")
  common=(--preset seed --tokenizer bytes --batch_size 512 --seq_len 1536 --max-steps 15
          --log_every 5)
fi
common+=(--data "$data" --cache_dir "$cache" --save_every 0 --eval_every 0 --progress false)

settings=$(printf '{"quick": %s, "budget_s": %s, "run_cap_s": %s, "gpu_counts": [%s]}' \
  "$([[ $quick == 1 ]] && echo true || echo false)" "$budget" "$cap" "$(IFS=,; echo "${counts[*]}")")
echo "tokenizing $data once (cache $cache) ..."
"$python" "$helper" init "$out" --data "$data" --cache_dir "$cache" --tokenizer bytes \
  --command-line "$0 $*" --settings "$settings" || exit 1

run() {  # label, number of processes, fsdp (true/false)
  local label=$1 n=$2 fsdp=$3
  local dir=$runs/${label}_$n log=$runs/${label}_$n.log
  local cmd=("$python" -m torch.distributed.run --standalone --nproc_per_node "$n"
    -m foldformer.cli train "${common[@]}" --fsdp "$fsdp" --out "$dir" "${extra[@]}")
  local flags=(--label "$label" --gpus "$n" --run-dir "$dir" --command "${cmd[*]}")
  [[ $fsdp == true ]] && flags+=(--fsdp)
  local left=$((budget - SECONDS - 5))
  if ((left < 25)); then
    "$python" "$helper" record "$out" "${flags[@]}" --skipped "time budget spent (SCALING_BUDGET=$budget)"
    return
  fi
  local limit=$((left < cap ? left : cap))
  echo "[$SECONDS s] $label: $n process(es), limit ${limit} s"
  local start=$SECONDS
  # timeout signals the whole process group: torchrun and its workers.
  timeout -k 10 "$limit" "${cmd[@]}" >"$log" 2>&1
  local rc=$?
  "$python" "$helper" record "$out" "${flags[@]}" --rc "$rc" --seconds $((SECONDS - start)) \
    --log "$log"
  cp "$log" "$kept/"
  [[ -f $dir/metrics.jsonl ]] && cp "$dir/metrics.jsonl" "$kept/${label}_$n.metrics.jsonl"
}

for n in "${counts[@]}"; do
  run ddp "$n" false
done
if [[ ${SCALING_FSDP:-1} == 1 ]]; then
  run fsdp 2 true
fi

"$python" "$helper" table "$out"
echo "total ${SECONDS} s; logs and metrics in $kept"
