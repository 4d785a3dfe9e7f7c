"""Ingestion speed and peak memory of `Engine.read` against context length, and the time to
answer a question from a saved context state against re-reading the text.

    PYTHONPATH=src python benchmarks/ingest.py --out benchmarks/results/cpu_serve/ingest.json
        [--device cpu|cuda] [--lengths 1K,4K,...,10M] [--budget SECONDS] [--compile] [--cuda-graph]
        [--checkpoint DIR | --d-model 128 --n-layers 2 --window 64 --memory 64]
        [--book 64K] [--answer-tokens 32]

Each length reads that many random token ids into a fresh stream, fold by fold; peak memory is
measured as `foldformer bench memory` does (CUDA: max_memory_allocated; CPU: the process's
peak RSS after resetting the kernel's high-water mark), minus what was live before (weights,
the ids). Lengths run in increasing order; one whose predicted time (from the last rate) would
pass --budget is recorded as skipped, so a run has a known upper bound. The book test reads
--book tokens, saves the state, then answers --answer-tokens greedily twice: from the loaded
state file, and after reading the book again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from foldformer.data.tokenizers import ByteTokenizer
from foldformer.evaluate.common import parse_list, parse_size
from foldformer.evaluate.memory import PeakMemory
from foldformer.generate import Engine, SamplingConfig, default_chunk_size
from foldformer.models import build_model

LENGTHS = "1K,4K,16K,64K,256K,1M,4M,10M"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(args, device: torch.device) -> Engine:
    if args.checkpoint:
        return Engine.load(args.checkpoint, device=device, compile=args.compile,
                           cuda_graph=args.cuda_graph)  # fmt: skip
    torch.manual_seed(0)
    shape = dict(vocab_size=257, d_model=args.d_model, n_layers=args.n_layers,
                 n_heads=max(1, args.d_model // 64), segment_len=args.window,
                 memory_len=args.memory)  # fmt: skip
    model = build_model("folded", shape).to(device)
    if args.compile:
        model.compile_fold()
    return Engine(model, ByteTokenizer(), cuda_graph=args.cuda_graph)


def time_read(engine: Engine, ids: torch.Tensor) -> tuple[float, PeakMemory]:
    device = engine.device
    sync(device)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        engine.read(ids)
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default=LENGTHS)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the lengths")
    parser.add_argument("--checkpoint")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--memory", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile the fold step")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay CUDA graphs of whole chunks of folds (Engine's option)")  # fmt: skip
    parser.add_argument("--book", default="64K", help="tokens of the book test")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engine = make_engine(args, device)
    vocab = int(engine.model.config.vocab_size)
    record = {
        "benchmark": "ingest",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {"model_type": engine.model.model_type, **engine.model.config.to_dict()},
        "compile": args.compile,
        "cuda_graph": args.cuda_graph,
        "lengths": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        out.write_text(json.dumps(record, indent=2) + "\n")

    # warm-up: two chunks (and so, with --cuda-graph, the graph's capture)
    warm = 2 * (engine.chunk_size or default_chunk_size(engine.model))
    engine.read(torch.randint(0, vocab, (warm,)).tolist())
    started, rate = time.perf_counter(), None
    for length in parse_list(args.lengths):
        row = {"tokens": length}
        remaining = args.budget - (time.perf_counter() - started)
        if rate is not None and length / rate > remaining:
            row["skipped"] = f"predicted {length / rate:.0f} s > {remaining:.0f} s left"
        else:
            ids = torch.randint(0, vocab, (1, length), device=device)
            seconds, peak = time_read(engine, ids)
            rate = length / seconds
            row.update(seconds=round(seconds, 3), tokens_per_s=round(rate, 1),
                       peak_bytes=peak.peak, work_bytes=max(0, peak.peak - peak.baseline))  # fmt: skip
            del ids
        record["lengths"].append(row)
        print(json.dumps(row), flush=True)
        write()

    # A question about a book: from its saved state, or by reading the book again.
    book = torch.randint(0, vocab, (1, parse_size(args.book)), device=device)
    question = "\nQ: what happened? A:"
    config = SamplingConfig(max_new_tokens=args.answer_tokens, temperature=0.0,
                            stop_at_eod=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / "book.state"
        engine.save_state(state_path, engine.read(book))
        sync(device)
        start = time.perf_counter()
        from_state = engine.complete([question], [engine.load_state(state_path)], config)[0]
        sync(device)
        state_seconds = time.perf_counter() - start
        start = time.perf_counter()
        reread = engine.complete([question], [engine.read(book)], config)[0]
        sync(device)
        reread_seconds = time.perf_counter() - start
        record["book"] = {
            "tokens": book.shape[1],
            "answer_tokens": args.answer_tokens,
            "state_file_bytes": state_path.stat().st_size,
            "from_saved_state_s": round(state_seconds, 4),
            "rereading_s": round(reread_seconds, 4),
            "speedup": round(reread_seconds / state_seconds, 1),
            "same_answer": from_state.token_ids == reread.token_ids,
        }
    print(json.dumps(record["book"]), flush=True)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
