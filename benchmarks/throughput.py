"""Training and streaming throughput of the presets on one GPU (bf16), with MFU.

    PYTHONPATH=src python benchmarks/throughput.py --out results.json [--quick]

Training: the step the training loop runs (per-fold activation checkpointing, chunked loss,
AdamW), on random tokens, for several batch widths, with and without torch.compile of the
fold step. Streaming: `generate.ingest`-style chunked reading of 1K … 1M tokens with no
gradients, peak memory from torch.cuda.max_memory_allocated.

MFU convention (DESIGN.md §6): model FLOPs per new token = 6·N·(m+w)/w for training
(2·N·(m+w)/w for inference), N the non-embedding parameters, plus attention
(12·L·d·(m+w) per token for training, 4·L·d·(m+w) for inference, causal half counted in
full) and the output head (6·d·V, 2·d·V), over the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.train import PRESETS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul FLOP/s on random data."""
    n = n if DEVICE == "cuda" else 512
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(config: FoldedConfig, n_params: int, training: bool) -> float:
    fold = config.memory_len + config.segment_len
    factor = 6 if training else 2
    body = factor * n_params * fold / config.segment_len
    attention = 2 * factor * config.n_layers * config.d_model * fold * fold / config.segment_len
    head = factor * config.d_model * config.vocab_size
    return body + attention + head


def preset_config(name: str, vocab_size: int) -> FoldedConfig:
    values = {k: v for k, v in PRESETS[name]["model"].items() if k != "model_type"}
    return FoldedConfig(vocab_size=vocab_size, **values)


def bench_training(config, batch, seq_len, compile_fold, steps, rate) -> dict:
    torch.manual_seed(0)
    model = FoldedTransformer(config).to(DEVICE)
    if compile_fold:
        model.compile_fold()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=DEVICE)
    memory = None
    reset_peak()

    def step():
        nonlocal memory
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(ids, memory=memory, labels=ids, checkpoint=True, return_logits=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory = out.memory.detach()

    for _ in range(2):  # warm-up (and compilation)
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq_len / seconds
    n = model.num_parameters()
    mfu = tokens_per_s * flops_per_token(config, n, training=True) / rate
    return {
        "batch": batch, "seq_len": seq_len, "folds_per_step": seq_len // config.segment_len,
        "compile_fold": compile_fold, "step_seconds": seconds, "tokens_per_s": tokens_per_s,
        "mfu": mfu, "peak_memory_gb": peak_gb(),
        "non_embedding_parameters": n,
    }  # fmt: skip


@torch.no_grad()
def bench_streaming(config, batch, total_tokens, chunk, compile_fold, rate) -> dict:
    chunk = min(chunk, total_tokens)
    torch.manual_seed(0)
    model = FoldedTransformer(config).to(DEVICE).eval().to(torch.bfloat16)
    if compile_fold:
        model.compile_fold()
    ids = torch.randint(0, config.vocab_size, (batch, chunk), device=DEVICE)
    model(ids, logits_to_keep=1)  # warm-up
    sync()
    reset_peak()
    memory, start = None, time.perf_counter()
    for _ in range(max(1, total_tokens // chunk)):
        memory = model(ids, memory=memory, logits_to_keep=1).memory
    sync()
    seconds = time.perf_counter() - start
    tokens = batch * chunk * max(1, total_tokens // chunk)
    n = model.num_parameters()
    return {
        "batch": batch, "stream_tokens_per_row": total_tokens, "chunk": chunk,
        "compile_fold": compile_fold, "tokens_per_s": tokens / seconds,
        "mfu": tokens / seconds * flops_per_token(config, n, training=False) / rate,
        "peak_memory_gb": peak_gb(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="never torch.compile")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rate = matmul_rate()
    print(f"measured bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s", flush=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16_matmul_flops": rate,
        "mfu_convention": __doc__.split("MFU convention")[1].strip(),
        "training": [],
        "streaming": [],
    }

    def record(kind, name, fn, *a):
        a = tuple(False if args.no_compile and x is True else x for x in a)
        try:
            row = {"preset": name, **fn(*a)}
        except Exception as error:  # an OOM in one setting should not lose the others
            row = {"preset": name, "error": f"{type(error).__name__}: {error}"[:300]}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        results[kind].append(row)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    seed = preset_config("seed", 8192)
    base = preset_config("base", 8192)
    if args.quick:  # a smoke test of the script itself, e.g. on a CPU
        seed = seed.replace(d_model=64, n_heads=4, n_layers=2, vocab_size=300)
        base = base.replace(d_model=64, n_heads=4, n_layers=2, vocab_size=300,
                            segment_len=64, memory_len=64)  # fmt: skip
    settings = [(256, False), (256, True), (1024, True)] if not args.quick else [(64, True)]
    for batch, compiled in settings:
        record(
            "training",
            "seed",
            bench_training,
            seed,
            batch,
            768,
            compiled,
            5 if not args.quick else 1,
            rate,
        )
    for batch, compiled in [(16, True), (32, True)] if not args.quick else [(4, True)]:
        record(
            "training",
            "base",
            bench_training,
            base,
            batch,
            2048 if not args.quick else 256,
            compiled,
            3 if not args.quick else 1,
            rate,
        )
    lengths = [1024, 16384, 131072, 1048576] if not args.quick else [1024, 16384]
    for total in lengths:
        record("streaming", "base", bench_streaming, base, 16, total, 4096, True, rate)
    for total in lengths[:2]:
        record(
            "streaming",
            "seed",
            bench_streaming,
            seed,
            1024 if not args.quick else 4,
            total,
            768,
            True,
            rate,
        )


if __name__ == "__main__":
    main()
