"""Passkey retrieval on one GPU (docs/retrieval.md): train, optionally from a model's weights,
then evaluate the DESIGN.md §6 grid one length at a time with the CUDA-graph ingest.

    PYTHONPATH=src python benchmarks/passkey_gpu.py --out DIR [--init MODEL_DIR] \
        [--minutes 5] [--lengths 1K,16K,128K,1M,4M,16M] [--deadline S] [--set key=value ...]
    PYTHONPATH=src python benchmarks/passkey_gpu.py --check-graph MODEL_DIR --out DIR

The model is the `tiny` preset at w = m = 128 (d = 128, 2 layers) with the memory gate, on
`synthetic:passkey` with the curriculum up to 128 folds (prompts of at most 16K tokens); `--set`
changes any field (`--set model.gate_activation=sigmoid --set data.train=...`). `--init` starts
from another run's weights with a fresh optimizer (the curriculum starts where `--set
data.train=...?n_folds=N` says). Lengths are evaluated in order until `--deadline` seconds
from the start, so the short ones are kept when a long one would not finish; each length
writes DIR/eval/passkey_LENGTH.json. `--check-graph` compares the CUDA-graph ingest with the
eager one on 100 passkey prompts (largest state difference, tokens/s of each).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

RECIPE = {
    "data.train": "synthetic:passkey?n_folds=1&max_folds=128&mix=0.5&window=256",
    "model.d_model": "128",
    "model.n_layers": "2",
    "model.n_heads": "4",
    "model.segment_len": "128",
    "model.memory_len": "128",
    "model.memory_gate": "true",
    "model.gate_activation": "clamp_st",
    "train.seq_len": "128",
    "train.batch_size": "128",
    "train.max_steps": "1000000",
    "train.warmup_steps": "0",
    "train.min_lr_ratio": "1.0",
    "train.weight_decay": "0.0",
    "train.beta2": "0.999",
    "train.eval_every": "0",
    "train.save_every": "0",
    "train.log_every": "25",
    "train.progress": "false",
}


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip


def train(args, out: Path) -> Path:
    from foldformer.models import load_model
    from foldformer.train import Trainer, load_run_config, unwrap

    overrides = dict(RECIPE)
    overrides["train.max_minutes"] = str(args.minutes)
    overrides["train.device"] = args.device
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = value
    run = load_run_config(None, "tiny", overrides)
    trainer = Trainer(run, out / "run")
    if args.init:
        source = load_model(args.init)  # its config must give the same shapes (strict load)
        unwrap(trainer.model).load_state_dict(source.state_dict())
        print(f"initialised from {args.init}")
    summary = trainer.train()
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return out / "run" / "final"


def evaluate(args, model_dir: Path, out: Path, started: float) -> None:
    from foldformer.evaluate.common import load_checkpoint, parse_size
    from foldformer.evaluate.passkey import evaluate_passkey, passkey_records
    from foldformer.evaluate.suite import eval_config

    model, tokenizer = load_checkpoint(model_dir, args.device)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    (out / "eval").mkdir(parents=True, exist_ok=True)
    for length in [parse_size(x) for x in args.lengths.split(",")]:
        if time.time() - started > args.deadline:
            print(f"deadline: {length} tokens not evaluated")
            break
        t0 = time.time()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        cells = evaluate_passkey(model, tokenizer, [length], depths, args.samples,
                                 batch_size=100, progress=False, cuda_graph=True)  # fmt: skip
        seconds = time.time() - t0
        config = eval_config(model, model_dir, task="passkey", lengths=[length], depths=depths,
                             samples=args.samples, seed=0, dtype="float32",
                             command=" ".join(sys.argv), seconds=seconds,
                             peak_gpu_gb=torch.cuda.max_memory_allocated() / 2**30
                             if torch.cuda.is_available() else None,
                             **machine())  # fmt: skip
        records = passkey_records(cells, config, args.device)
        (out / "eval" / f"passkey_{length}.json").write_text(json.dumps(records, indent=1))
        row = " ".join(f"{c.accuracy:.0%}" for c in cells)
        print(f"passkey {length} tokens in {seconds:.0f} s: {row}", flush=True)


def check_graph(args, out: Path) -> None:
    """The CUDA-graph ingest against the eager one on the same 100 prompts."""
    from foldformer.data.passkey import build_passkey_prompt
    from foldformer.evaluate.common import load_checkpoint, parse_size
    from foldformer.generate import ingest

    model, tokenizer = load_checkpoint(args.check_graph, args.device)
    results = []
    for length in [parse_size(x) for x in args.lengths.split(",")]:
        prompts = [build_passkey_prompt(tokenizer, length, i / 99, seed=i).ids for i in range(100)]
        n = min(map(len, prompts)) - 1  # lengths differ by up to a filler sentence
        ids = torch.tensor([p[:n] for p in prompts], device=args.device)
        timings, states = {}, {}
        for graph in (False, True):
            torch.cuda.synchronize()
            t0 = time.time()
            states[graph] = ingest(model, ids, cuda_graph=graph).memory
            torch.cuda.synchronize()
            timings[graph] = time.time() - t0
        diff = (states[True] - states[False]).abs().max().item()
        record = {"length": length, "rows": 100, "max_abs_state_difference": diff,
                  "eager_s": timings[False], "graph_s": timings[True],
                  "eager_tokens_per_s_per_row": ids.shape[1] / timings[False],
                  "graph_tokens_per_s_per_row": ids.shape[1] / timings[True]}  # fmt: skip
        print(json.dumps(record), flush=True)
        results.append(record)
    (out / "graph_check.json").write_text(
        json.dumps({"model": args.check_graph, **machine(), "results": results}, indent=1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", help="start from this model directory's weights")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--lengths", default="1K,16K,128K,1M,4M,16M")
    parser.add_argument("--samples", type=int, default=20, help="keys per (length, depth) cell")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds from the start")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--check-graph", metavar="MODEL_DIR")
    parser.add_argument("--eval-only", metavar="MODEL_DIR", help="evaluate this model, no training")
    args = parser.parse_args()
    started, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.check_graph:
        check_graph(args, out)
        return
    model_dir = Path(args.eval_only) if args.eval_only else train(args, out)
    evaluate(args, model_dir, out, started)


if __name__ == "__main__":
    main()
