"""Training and streaming throughput of the presets on one GPU (bf16), with MFU and a profile.

    PYTHONPATH=src python benchmarks/throughput.py --out results.json [--profile DIR]
        [--only seed_train,base_train,stream,profile] [--budget SECONDS] [--resume OLD.json]
        [--quick]

Training: the product's own step, `foldformer.train.Trainer.train_step` (chunked loss, the
carried memory and reset mask, gradient clipping, AdamW and its schedule), with and without
per-fold activation checkpointing, on random tokens, for several batch widths, eager or with
the fold step compiled (`compile_mode` "default", or "reduce-overhead": CUDA graphs of the
fold step). Streaming: `generate.ingest`-style chunked reading of 1K … 1M tokens a row with no
gradients, peak memory from torch.cuda.max_memory_allocated. Profile (`--profile DIR`): one
compiled `seed` and one `base` training step under torch.profiler: DIR/profile_{seed,base}.txt
hold the kernel table and a summary (GPU busy fraction, kernel time by kind), also written into
the JSON under "profile"; `--trace` adds Chrome traces (large).

The seed preset is byte-level (vocabulary 257); base keeps 8192 (`--seed-vocab`,
`--base-vocab`). Every row records its vocabulary, checkpointing, compile mode, the timed steps
and the wall seconds the whole row took (compilation included). Settings run most important
first; `--budget` skips what would start after that many seconds (a "skipped" row) and cuts a
row still running then (an error row), so one call has a known upper bound; the JSON is
rewritten after every row, and rows are listed there in a fixed order whatever ran (the
default budget, 290 s, keeps a full run on an H200 within about 5 minutes).
`--resume OLD.json` keeps OLD's measured rows and runs only the others (errors, skipped).

MFU: `foldformer.evaluate.flops` (DESIGN.md §6; its CONVENTION is stored in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.data.streams import Batch
from foldformer.evaluate import flops
from foldformer.model import FoldState
from foldformer.presets import PRESETS
from foldformer.train import DataConfig, RunConfig, TrainConfig, Trainer, unwrap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = ("seed_train", "base_train", "stream", "profile")
# max-autotune-no-cudagraphs: Triton matmul templates with fused epilogues (benchmarks/seed_step.py)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def matmul_rate() -> float:
    """Measured dense bf16 matmul FLOP/s on this script's device (flops.matmul_rate)."""
    return flops.matmul_rate(DEVICE)


def preset_config(name: str, vocab_size: int) -> FoldedConfig:
    values = {k: v for k, v in PRESETS[name]["model"].items() if k != "model_type"}
    return FoldedConfig(vocab_size=vocab_size, **values)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the settings
# ---------------------------------------------------------------------------------------------


def compile_model(model: FoldedTransformer, compile_mode: str) -> str:
    """Compile the fold step as asked; returns the mode in effect ("none" on a CPU, where
    inductor would take longer than the whole benchmark)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r} is not one of {COMPILE_MODES}")
    if compile_mode == "none" or DEVICE != "cuda":
        return "none"
    model.compile_fold(mode=compile_mode)
    return compile_mode


def fresh_state(model: FoldedTransformer, batch: int) -> FoldState:
    """M0 in every row as a contiguous tensor: the first call then sees the same kind of input
    as every later one (an expanded M0 would be one more compiled variant)."""
    return FoldState(memory=model.initial_state(batch).memory.contiguous())


def clone_state(state: FoldState) -> FoldState:
    """A copy outside the CUDA-graph pool: graph outputs are overwritten by the next replay
    (the next iteration marked by cudagraph_mark_step_begin), carried memory must survive it."""
    return FoldState.from_state_dict({k: v.clone() for k, v in state.state_dict().items()})


class FixedBatches:
    """A batch source for Trainer: one batch of random tokens, no document boundaries."""

    def __init__(self, vocab_size: int, batch: int, seq_len: int):
        ids = torch.randint(0, vocab_size, (batch, seq_len))
        self.batch = Batch(ids, ids, torch.zeros(batch, seq_len, dtype=torch.bool))

    def next_batch(self) -> Batch:
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainStep:
    """One step of the product's training loop, `foldformer.train.Trainer.train_step` (carried
    memory, resets, clipping, the optimizer and its schedule), bf16, on fixed random tokens."""

    def __init__(
        self, config: FoldedConfig, batch: int, seq_len: int, compile_mode: str, checkpoint: bool
    ):
        settings = TrainConfig(batch_size=batch, seq_len=seq_len, checkpoint_folds=checkpoint,
                               precision="bf16", device=DEVICE, lr=1e-4, max_steps=10**9,
                               progress=False)  # fmt: skip
        run = RunConfig({"model_type": "folded", **config.to_dict()}, settings, DataConfig())
        self.out_dir = tempfile.TemporaryDirectory()  # Trainer writes run_config.json there
        source = FixedBatches(config.vocab_size, batch, seq_len)
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's banner
            self.trainer = Trainer(run, self.out_dir.name, batch_source=source)
        self.model = unwrap(self.trainer.model)
        self.compile_mode = compile_model(self.model, compile_mode)
        self.graphs = self.compile_mode == "reduce-overhead"
        self.trainer.stream_memory = fresh_state(self.model, batch)
        self.batch = source.batch

    def __call__(self) -> None:
        if self.graphs:  # one training step is one CUDA-graph-tree iteration
            torch.compiler.cudagraph_mark_step_begin()
        self.trainer.train_step(self.batch)  # the carried memory is a copy (FoldState.concat)


def timed(fn: Callable[[], None], steps: int) -> float:
    """Seconds per call of fn over `steps` calls, the GPU synchronised at both ends."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------


def bench_training(
    config: FoldedConfig,
    batch: int,
    seq_len: int,
    compile_mode: str,
    checkpoint: bool,
    steps: int,
    rate: float,
    warmup: int = 2,
) -> dict[str, Any]:
    step = TrainStep(config, batch, seq_len, compile_mode, checkpoint)
    for _ in range(warmup):  # compilation, and CUDA-graph warm-up and recording
        step()
    sync()
    reset_peak()
    seconds = timed(step, steps)
    tokens_per_s = batch * seq_len / seconds
    n = step.trainer.n_params
    return {
        "batch": batch, "seq_len": seq_len, "folds_per_step": seq_len // config.segment_len,
        "vocab_size": config.vocab_size, "checkpoint": checkpoint,
        "compile_fold": step.compile_mode != "none", "compile_mode": step.compile_mode,
        "warmup_steps": warmup, "steps": steps, "step_seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops.flops_per_token(config, n, True, seq_len) / rate,
        "peak_memory_gb": peak_gb(), "non_embedding_parameters": n,
    }  # fmt: skip


@torch.no_grad()
def bench_streaming(
    config: FoldedConfig,
    batch: int,
    total_tokens: int,
    chunk: int,
    compile_mode: str,
    rate: float,
) -> dict[str, Any]:
    chunk = min(chunk, total_tokens)
    torch.manual_seed(0)
    model = FoldedTransformer(config).to(DEVICE).eval().to(torch.bfloat16)
    mode = compile_model(model, compile_mode)
    graphs = mode == "reduce-overhead"
    ids = torch.randint(0, config.vocab_size, (batch, chunk), device=DEVICE)

    def read(memory: FoldState) -> FoldState:
        if graphs:  # one chunk is one iteration: its folds' outputs live until the next chunk
            torch.compiler.cudagraph_mark_step_begin()
        memory = model(ids, memory=memory, logits_to_keep=1).memory
        return clone_state(memory) if graphs else memory

    memory = fresh_state(model, batch)
    for _ in range(3 if graphs else 1):  # compile; CUDA graphs: warm-up, record, replay
        memory = read(memory)
    sync()
    reset_peak()
    chunks = max(1, total_tokens // chunk)
    memory, start = fresh_state(model, batch), time.perf_counter()
    for _ in range(chunks):
        memory = read(memory)
    sync()
    seconds = time.perf_counter() - start
    tokens = batch * chunk * chunks
    n = model.num_parameters()
    return {
        "batch": batch, "stream_tokens_per_row": total_tokens, "chunk": chunk, "chunks": chunks,
        "vocab_size": config.vocab_size, "compile_fold": mode != "none", "compile_mode": mode,
        "tokens_per_s": tokens / seconds,
        "mfu": tokens / seconds * flops.flops_per_token(config, n, False, chunk) / rate,
        "peak_memory_gb": peak_gb(),
    }  # fmt: skip


def kernel_kind(name: str) -> str:
    """matmul, attention, triton (inductor's fused kernels) or other, by kernel name."""
    lowered = name.lower()
    if lowered.startswith("triton_tem"):  # an inductor matmul template
        return "matmul"
    if lowered.startswith("triton"):  # named after the ops it fuses, which may say "attention"
        return "triton"
    if any(k in lowered for k in ("flash", "fmha", "sdpa", "attention", "attn")):
        return "attention"
    matmul = ("gemm", "cutlass", "cublas", "nvjet", "xmma", "wgmma", "matmul", "sm90", "sm80",
              "s16816", "s1688")  # fmt: skip
    if any(k in lowered for k in matmul):
        return "matmul"
    return "other"


def kernel_summary(events: list[tuple[str, float, float]], wall_seconds: float, steps: int):
    """Per-step kernel time and its split by kind, from (name, start_us, end_us) GPU events.

    busy = the union of kernel intervals (overlapping streams counted once); the rest of the
    wall time the GPU waits for launches, the Python loop or the CPU.
    """
    by_kind = dict.fromkeys(("matmul", "attention", "triton", "other"), 0.0)
    top: dict[str, float] = {}
    total = 0.0
    for name, start, end in events:
        us = max(0.0, end - start)
        total += us
        by_kind[kernel_kind(name)] += us
        top[name] = top.get(name, 0.0) + us
    busy, reach = 0.0, -math.inf
    for _, start, end in sorted(events, key=lambda e: e[1]):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    per_step = wall_seconds / steps
    return {
        "step_seconds_profiled": per_step,
        "kernels_per_step": len(events) / steps,
        "kernel_seconds_per_step": total / 1e6 / steps,
        "gpu_busy_seconds_per_step": busy / 1e6 / steps,
        "gpu_busy_fraction": busy / 1e6 / wall_seconds if wall_seconds > 0 else None,
        "mean_kernel_us": total / len(events) if events else None,
        "kernel_fraction_by_kind": {k: v / total if total else 0.0 for k, v in by_kind.items()},
        "kernel_seconds_per_step_by_kind": {k: v / 1e6 / steps for k, v in by_kind.items()},
        "top_kernels": [
            {"name": name[:120], "seconds_per_step": us / 1e6 / steps}
            for name, us in sorted(top.items(), key=lambda kv: -kv[1])[:8]
        ],
    }


def profile_training(
    config: FoldedConfig,
    batch: int,
    seq_len: int,
    compile_mode: str,
    checkpoint: bool,
    rate: float,
    name: str,
    out_dir: Path,
    trace: bool = False,
    steps: int = 2,
) -> dict[str, Any]:
    """Warm up, time `steps` plain steps, then profile `steps` more; write the table file."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = TrainStep(config, batch, seq_len, compile_mode, checkpoint)
    for _ in range(2):
        step()
    plain_seconds = timed(step, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - start
    # GPU work: kernels, memcpy, memset; not the GPU-side ranges of record_function
    # annotations, which span many kernels and would count them twice.
    gpu_events = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    summary = {
        "batch": batch, "seq_len": seq_len, "vocab_size": config.vocab_size,
        "checkpoint": checkpoint, "compile_mode": step.compile_mode, "profiled_steps": steps,
        "step_seconds_unprofiled": plain_seconds,
        "tokens_per_s_unprofiled": batch * seq_len / plain_seconds,
        **kernel_summary(gpu_events, wall, steps),
    }  # fmt: skip
    if DEVICE != "cuda":
        summary["gpu_busy_fraction"] = None  # nothing ran on a GPU
    elif not gpu_events:  # CUPTI unavailable: no kernel times, not an idle GPU
        summary["gpu_busy_fraction"] = None
        summary["note"] = "the profiler recorded no GPU kernels (CUPTI unavailable?)"
    elif plain_seconds > 0:
        summary["gpu_busy_fraction_of_unprofiled_step"] = min(
            1.0, summary["gpu_busy_seconds_per_step"] / plain_seconds
        )
    sort_by = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=80)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"profile of one {name} training step ({steps} steps profiled after warm-up)", ""]
    lines += [f"{k}: {v}" for k, v in summary.items() if k != "top_kernels"]
    lines += ["", "top kernels (seconds per step):"]
    lines += [f"  {k['seconds_per_step']:.6f}  {k['name']}" for k in summary["top_kernels"]]
    lines += ["", f"key_averages sorted by {sort_by} (top 30):", table]
    (out_dir / f"profile_{name}.txt").write_text("\n".join(lines) + "\n")
    if trace:
        prof.export_chrome_trace(str(out_dir / f"trace_{name}.json"))
    return summary


# ---------------------------------------------------------------------------------------------
# Running settings robustly: one row each, whatever happens
# ---------------------------------------------------------------------------------------------


class RowTimeout(Exception):
    """A setting ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RowTimeout in the main thread after `seconds` (0: no limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds <= 0 or not usable:
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"stopped after {seconds:.0f} s (time limit)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def cudagraph_skip_reasons() -> Iterator[list[str]]:
    """Collect inductor's "skipping cudagraphs due to ..." messages (a log off by default)."""
    import logging

    reasons: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "skipping cudagraphs" in message:
                reasons.append(message[:200])

    try:
        from torch._inductor.cudagraph_utils import cudagraphs_log as logger
    except ImportError:  # another torch version: no reasons, the counter still says how many
        yield reasons
        return
    handler, level, disabled = Collect(logging.WARNING), logger.level, logger.disabled
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.WARNING) if level else logging.WARNING)
    logger.disabled = False
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


@dataclass
class Setting:
    """One row: `fn(**args, rate=...)` for preset `preset`, run in `priority` order."""

    group: str  # seed_train | base_train | stream | profile
    kind: str  # training | streaming | profile
    preset: str
    fn: Callable[..., dict[str, Any]]
    args: dict[str, Any]
    priority: int = 0
    order: int = field(default=0, compare=False)  # its place in the JSON lists

    def describe(self) -> dict[str, Any]:
        """The setting's own fields, for rows that error or are skipped."""
        out = {k: v for k, v in self.args.items() if isinstance(v, (int, float, str, bool))}
        config = self.args.get("config")
        if config is not None:
            out["vocab_size"] = config.vocab_size
        return out

    def label(self, compile_mode: str | None = None) -> str:
        """E.g. "train compiled ckpt", "stream graphs 128K/row" (compile_mode: what ran)."""
        a = self.args
        mode = compile_mode or a.get("compile_mode", "none")
        mode = {"none": "eager", "default": "compiled", "reduce-overhead": "graphs",
                "max-autotune-no-cudagraphs": "autotuned"}[mode]  # fmt: skip
        if self.kind == "training":
            return f"train {mode}{' ckpt' if a['checkpoint'] else ''}"
        if self.kind == "streaming":
            return f"stream {mode} {tokens_text(a['total_tokens'])}/row"
        return f"profile {mode}"


def tokens_text(n: int) -> str:
    """1024 -> 1K, 1048576 -> 1M, 192 -> 192."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def build_settings(quick: bool, seed_vocab: int, base_vocab: int, profile_dir, trace: bool):
    """Every setting, in the order of the JSON lists; `priority` says which run first."""
    seed = preset_config("seed", seed_vocab)
    base = preset_config("base", base_vocab)
    if quick:  # a smoke test of the script itself, e.g. on a CPU
        seed = seed.replace(d_model=64, n_heads=4, n_layers=2)
        base = base.replace(d_model=64, n_heads=4, n_layers=2, segment_len=64, memory_len=64)
    seed_len, base_len = (48, 256) if quick else (768, 2048)
    settings: list[Setting] = []

    def add(priority, group, kind, preset, fn, **args):
        settings.append(Setting(group, kind, preset, fn, args, priority, len(settings)))

    def train(priority, preset, config, batch, seq_len, mode, checkpoint, steps, warmup=2):
        group = f"{preset}_train"
        add(priority, group, "training", preset, bench_training, config=config, batch=batch,
            seq_len=seq_len, compile_mode=mode, checkpoint=checkpoint, steps=steps,
            warmup=warmup)  # fmt: skip

    def stream(priority, preset, config, batch, total, chunk, mode):
        add(priority, "stream", "streaming", preset, bench_streaming, config=config,
            batch=batch, total_tokens=total, chunk=chunk, compile_mode=mode)  # fmt: skip

    if quick:
        train(0, "seed", seed, 8, seed_len, "default", True, 1, warmup=1)
        train(1, "seed", seed, 8, seed_len, "reduce-overhead", True, 1, warmup=1)
        train(2, "seed", seed, 8, seed_len, "default", False, 1, warmup=1)
        train(0, "base", base, 2, base_len, "default", True, 1, warmup=1)
        train(1, "base", base, 2, base_len, "default", False, 1, warmup=1)
        stream(0, "base", base, 2, 1024, 512, "default")
        stream(1, "base", base, 2, 1024, 512, "reduce-overhead")
        stream(2, "seed", seed, 4, 192, 96, "default")
    else:
        # Priority (run order): the targets' settings and the profile first (it reuses their
        # compiled graphs from inductor's cache), what was measured before last.
        train(170, "seed", seed, 256, seed_len, "none", True, 2, warmup=1)
        train(160, "seed", seed, 256, seed_len, "default", True, 4)
        train(0, "seed", seed, 1024, seed_len, "default", True, 3)
        train(100, "seed", seed, 2048, seed_len, "default", True, 2)
        # 512 rows x 1536 tokens (128 folds): the seed step of round 3 and of scaling.sh
        train(90, "seed", seed, 512, 2 * seed_len, "default", True, 2)
        train(110, "seed", seed, 1024, seed_len, "reduce-overhead", True, 3)
        train(220, "seed", seed, 256, seed_len, "reduce-overhead", False, 3)
        train(130, "base", base, 16, base_len, "default", True, 3)
        train(10, "base", base, 32, base_len, "default", True, 3)
        train(140, "base", base, 16, base_len, "default", False, 3)
        train(20, "base", base, 32, base_len, "default", False, 3)
        for priority, total in zip(
            (180, 190, 60, 150), (1024, 16384, 131072, 1048576), strict=True
        ):
            stream(priority, "base", base, 16, total, 4096, "default")
        stream(50, "base", base, 64, 131072, 4096, "default")
        stream(70, "base", base, 16, 131072, 4096, "reduce-overhead")
        stream(80, "base", base, 64, 131072, 4096, "reduce-overhead")
        stream(200, "seed", seed, 1024, 1024, 768, "default")
        stream(210, "seed", seed, 1024, 16384, 768, "default")
        stream(120, "seed", seed, 1024, 16384, 768, "reduce-overhead")
    if profile_dir is not None:
        common = dict(out_dir=Path(profile_dir), trace=trace, compile_mode="default",
                      checkpoint=True)  # fmt: skip
        common["steps"] = 1 if quick else 2
        add(30, "profile", "profile", "seed", profile_training, config=seed,
            batch=8 if quick else 1024, seq_len=seed_len, name="seed", **common)  # fmt: skip
        add(40, "profile", "profile", "base", profile_training, config=base,
            batch=2 if quick else 32, seq_len=base_len, name="base", **common)  # fmt: skip
    return settings


def run_setting(setting: Setting, rate: float, deadline: float, row_timeout: float) -> dict:
    """The setting's row: its result, or an "error" or "skipped" row; never raises."""
    row: dict[str, Any] = {"preset": setting.preset}
    remaining = deadline - time.perf_counter()
    if remaining < 10:
        return {**row, **setting.describe(), "skipped": "time budget spent (--budget)"}
    limit = min(row_timeout, remaining) if row_timeout > 0 else remaining
    limit = 0 if math.isinf(limit) else limit
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    skips_before = counters["inductor"]["cudagraph_skips"]
    start = time.perf_counter()
    try:
        with time_limit(limit), cudagraph_skip_reasons() as reasons:
            row.update(setting.fn(**setting.args, rate=rate))
    except Exception as error:  # an OOM or a compile failure must not lose the other rows
        row.update(setting.describe())
        row["error"] = f"{type(error).__name__}: {error}"[:400]
    row["row_seconds"] = time.perf_counter() - start
    row["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs_before
    if setting.args.get("compile_mode") == "reduce-overhead":
        # Inductor silently runs a graph without CUDA graphs when it cannot capture it: say so.
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
        if reasons:
            row["cudagraph_skip_reasons"] = sorted(set(reasons))[:5]
    # A fresh start for the next row: compiled code, CUDA-graph pools, cached blocks.
    try:
        torch._dynamo.reset()
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    except Exception as error:  # e.g. a sticky CUDA error: later rows will say so themselves
        row["cleanup_error"] = f"{type(error).__name__}: {error}"[:200]
    return row


def format_table(results: dict[str, Any]) -> str:
    """A compact text table of every row (the device call returns only the output's tail)."""
    lines = [f"{'preset':6} {'what':28} {'batch':>5} {'tokens/s':>9} {'MFU':>6} {'peak GB':>7}"]
    for kind in ("training", "streaming"):
        for row in results[kind]:
            what = row.get("label", kind)
            if "error" in row or "skipped" in row:
                note = row.get("error") or row.get("skipped")
                lines.append(f"{row['preset']:6} {what:28} {row.get('batch', ''):>5} {note[:60]}")
                continue
            peak = row.get("peak_memory_gb")
            lines.append(
                f"{row['preset']:6} {what:28} {row['batch']:>5} "
                f"{row['tokens_per_s'] / 1e3:>8.1f}K {100 * row['mfu']:>5.1f}% "
                f"{'-' if peak is None else f'{peak:.1f}':>7}"
            )
    for name, summary in results.get("profile", {}).items():
        if "error" in summary or "skipped" in summary:
            lines.append(f"profile {name}: {summary.get('error') or summary.get('skipped')}")
            continue
        if summary.get("note"):
            lines.append(f"profile {name}: {summary['note']}")
        busy = summary.get("gpu_busy_fraction")
        split = " ".join(
            f"{k} {100 * v:.0f}%" for k, v in summary["kernel_fraction_by_kind"].items()
        )
        lines.append(
            f"profile {name}: step {summary['step_seconds_unprofiled']:.3f} s, "
            f"{summary['kernels_per_step']:.0f} kernels/step, GPU busy "
            f"{'-' if busy is None else f'{100 * busy:.0f}%'}; kernel time: {split}"
        )
    return "\n".join(lines)


def setting_key(setting: Setting) -> tuple:
    """What identifies a row: kind, preset, shape, compile mode, checkpointing, vocabulary."""
    a = setting.args
    if setting.kind == "profile":
        return ("profile", setting.preset)
    size = a["seq_len"] if setting.kind == "training" else a["total_tokens"]
    checkpoint = a.get("checkpoint") if setting.kind == "training" else None
    return (setting.kind, setting.preset, a["batch"], size, a["compile_mode"], checkpoint,
            a["config"].vocab_size)  # fmt: skip


def previous_rows(results: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """The measured rows (no error, not skipped) of a results file, by setting_key."""
    done: dict[tuple, dict[str, Any]] = {}
    for kind in ("training", "streaming"):
        for row in results.get(kind, []):
            if "tokens_per_s" not in row:
                continue
            training = kind == "training"
            size = row.get("seq_len") if training else row.get("stream_tokens_per_row")
            key = (kind, row.get("preset"), row.get("batch"), size, row.get("compile_mode"),
                   row.get("checkpoint") if training else None, row.get("vocab_size"))  # fmt: skip
            done[key] = row
    for preset, summary in results.get("profile", {}).items():
        if "error" not in summary and "skipped" not in summary:
            done[("profile", preset)] = summary
    return done


def parse_only(text: str | None) -> set[str]:
    if not text:
        return set(GROUPS)
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(GROUPS))
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {unknown}; parts: {', '.join(GROUPS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="results JSON (rewritten after every row)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, CPU ok)")
    parser.add_argument("--no-compile", action="store_true", help="never torch.compile")
    parser.add_argument("--only", help=f"comma list of parts to run: {', '.join(GROUPS)}")
    parser.add_argument("--profile", metavar="DIR", help="profile one seed and one base step")
    parser.add_argument("--trace", action="store_true", help="with --profile: Chrome traces too")
    parser.add_argument("--seed-vocab", type=int, default=257, help="seed rows (byte-level)")
    parser.add_argument("--base-vocab", type=int, default=8192, help="base rows")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run, later rows skipped (default 290, "
                             "--quick none; 0: no limit)")  # fmt: skip
    parser.add_argument("--row-timeout", type=float, default=180.0,
                        help="seconds one setting may take before it is cut (0: no limit)")  # fmt: skip
    parser.add_argument("--resume", metavar="JSON",
                        help="a previous results file: its measured rows are kept, not rerun")  # fmt: skip
    args = parser.parse_args(argv)
    only = parse_only(args.only)
    if "profile" in only and args.only and args.profile is None:
        parser.error("--only profile needs --profile DIR (where the profile tables go)")
    started = time.perf_counter()
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 290.0)
    deadline = started + budget if budget > 0 else math.inf
    torch.backends.cuda.matmul.allow_tf32 = True
    rate = matmul_rate()
    print(f"measured bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s", flush=True)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16_matmul_flops": rate,
        "mfu_convention": flops.CONVENTION,
        "only": sorted(only),
        "budget_seconds": budget,
        "training": [],
        "streaming": [],
        "profile": {},
    }
    settings = [
        s
        for s in build_settings(
            args.quick, args.seed_vocab, args.base_vocab, args.profile, args.trace
        )
        if s.group in only
    ]
    if args.no_compile:
        for s in settings:
            s.args["compile_mode"] = "none"
    rows: dict[int, tuple[Setting, dict[str, Any]]] = {}
    if args.resume:
        previous = json.loads(Path(args.resume).read_text())
        done = previous_rows(previous)
        for s in settings:
            if setting_key(s) in done:
                rows[s.order] = (s, {**done[setting_key(s)], "from_run": previous.get("date")})
        print(f"--resume: {len(rows)} measured row(s) kept from {args.resume}", flush=True)

    def write() -> None:
        for kind in ("training", "streaming"):
            results[kind] = [row for _, (s, row) in sorted(rows.items()) if s.kind == kind]
        results["profile"] = {
            s.preset: row for _, (s, row) in sorted(rows.items()) if s.kind == "profile"
        }
        results["total_seconds"] = time.perf_counter() - started
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    for setting in sorted(settings, key=lambda s: (s.priority, s.order)):
        if setting.order in rows:
            continue
        row = run_setting(setting, rate, deadline, args.row_timeout)
        if setting.kind != "profile":
            row["label"] = setting.label(row.get("compile_mode"))
        rows[setting.order] = (setting, row)
        print(json.dumps(row), flush=True)
        write()
    write()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; MFU as in DESIGN.md §6 (no recompute)")
    print(format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
