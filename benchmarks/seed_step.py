"""The `seed` training step (w = m = 12: 24-position folds) by attention kernel and batch width.

    PYTHONPATH=src python benchmarks/seed_step.py --out seed_step.json \\
        [--rows attention|width|modes|all] [--pick I ...] [--budget SECONDS]

The profile of the seed step (docs/results.md) puts a fifth of the GPU time in cuDNN's fused
attention on 24 positions: its tiles are 64-128 queries wide, so most of each tile is padding.
This script times the same compiled training step (benchmarks/throughput.py's TrainStep:
chunked loss, fused AdamW, per-fold checkpointing, bf16) with each attention kernel PyTorch
offers for the fold:

- cudnn, flash, efficient, math: the model's ``attention="sdpa"`` kernel restricted to one
  backend (`torch.nn.attention.sdpa_kernel`), chosen when the fold step is compiled;
- packed: FlexAttention over several batch rows packed into one sequence with a
  block-diagonal causal mask (`packed_causal_attention` below), so one tile holds several
  folds; registered in the model's attention table (`foldformer.layers.register_attention`)
  and chosen with ``attention="packed"`` in the model config.

Before timing, each kernel's output and gradients on one fold are compared with a float64
reference ("max_error" in the row). `--rows width` times batch widths and sequence lengths
(the recipe of the seed ECL runs); `--rows modes` CUDA graphs of the fold step
(`reduce-overhead`) and Triton matmul templates with fused epilogues (`max-autotune`). MFU as
in benchmarks/throughput.py (DESIGN.md §6, recomputation not counted). The JSON is rewritten
after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from throughput import DEVICE, bench_training, matmul_rate, preset_config
from torch import Tensor

from foldformer.layers import ATTENTION, register_attention, sdpa_attention

SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
ATTENTIONS = (*SDPA_BACKENDS, "packed")


def packed_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """The model's causal attention for short folds on a GPU: FlexAttention over several
    batch rows packed into one sequence of at most 128 positions (one tile), each row masked to
    itself. Fused kernels pad a 24-position fold to a 64-128-query tile; packing fills the
    tile. Meant for a compiled fold step (FlexAttention is slow eager, no CPU backward); a
    cached or masked call (a partial fold) is plain SDPA."""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, N, D = q.shape
    rows = next((r for r in range(128 // N, 1, -1) if B % r == 0), 1)
    if rows == 1 or dropout_p or mask is not None or k.shape[2] != N:
        return sdpa_attention(q, k, v, mask, dropout_p)

    def same_row_causal(score, b, h, q_idx, kv_idx):
        keep = (q_idx // N == kv_idx // N) & (kv_idx <= q_idx)
        return torch.where(keep, score, -float("inf"))

    def pack(t: Tensor) -> Tensor:  # (B, H, N, D) -> (B / rows, H, rows * N, D)
        return t.transpose(1, 2).reshape(B // rows, rows * N, H, D).transpose(1, 2)

    y = flex_attention(pack(q), pack(k), pack(v), score_mod=same_row_causal)
    return y.transpose(1, 2).reshape(B, N, H, D).transpose(1, 2)


register_attention("packed", packed_causal_attention)


def kernel_setting(name: str) -> tuple[str, contextlib.AbstractContextManager]:
    """The model config's `attention` for row kernel `name`, and the SDPA backends allowed
    while the fold step is compiled (one backend for the SDPA rows)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "packed":
        return "packed", contextlib.nullcontext()
    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return "sdpa", sdpa_kernel([backend])


def kernel_error(name: str, batch: int = 64, fold: int = 24, heads: int = 6, dim: int = 64):
    """Largest absolute difference of output and gradients (bf16) from a float64 reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, fold, dim, device=DEVICE) for _ in range(3))
    grad = torch.randn(batch, heads, fold, dim, device=DEVICE)

    def run(dtype, attention):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(grad.to(dtype))
        return [out.double(), *(t.grad.double() for t in inputs)]

    reference = run(
        torch.float64, lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)
    )
    attention, backends = kernel_setting(name)
    with backends:
        compiled = torch.compile(lambda a, b, c: ATTENTION[attention](a, b, c))
        got = run(torch.bfloat16, compiled)
    torch._dynamo.reset()
    return max((g - r).abs().max().item() for g, r in zip(got, reference, strict=True))


def row(
    name: str, batch: int, seq_len: int, checkpoint: bool, mode: str, rate: float
) -> dict[str, Any]:
    attention, backends = kernel_setting(name)
    config = preset_config("seed", 257).replace(attention=attention)
    start = time.perf_counter()
    out: dict[str, Any] = {"attention": name}
    try:
        out["max_error"] = kernel_error(name)
        with backends:
            out.update(bench_training(config, batch, seq_len, mode, checkpoint, 3, rate))
    except Exception as error:  # one kernel failing must not lose the other rows
        out.update(batch=batch, seq_len=seq_len, checkpoint=checkpoint, compile_mode=mode)
        out["error"] = f"{type(error).__name__}: {error}"[:400]
    out["row_seconds"] = time.perf_counter() - start
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache() if DEVICE == "cuda" else None
    return out


# (attention, rows, bytes a row, per-fold checkpointing, compile mode), by group
ROWS: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "attention": [
        (name, 1024, 768, True, "default")
        for name in ("cudnn", "packed", "math", "flash", "efficient")
    ],
    "width": [
        ("packed", 2048, 768, True, "default"),
        ("packed", 256, 1536, True, "default"),
        ("cudnn", 256, 1536, True, "default"),
        ("packed", 128, 1536, True, "default"),
        ("packed", 512, 384, False, "default"),
    ],
    # CUDA graphs of the fold step (for the launch-bound widths), and Triton matmul templates
    # whose epilogues fuse the element-wise work after them (minutes of autotuning a row)
    "modes": [
        ("cudnn", 256, 1536, True, "reduce-overhead"),
        ("cudnn", 1024, 768, True, "reduce-overhead"),
        ("cudnn", 1024, 768, True, "max-autotune-no-cudagraphs"),
    ],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON (rewritten after every row)")
    parser.add_argument("--rows", choices=(*ROWS, "all"), default="all",
                        help="a group of rows, or all of them in order")  # fmt: skip
    parser.add_argument("--pick", type=int, nargs="+", metavar="I",
                        help="only these rows of the chosen rows, counted from 0")  # fmt: skip
    parser.add_argument("--budget", type=float, default=280.0, help="start no row after this")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rate = matmul_rate()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16_matmul_flops": rate,
        "mfu_convention": "DESIGN.md §6; recomputation not counted (benchmarks/throughput.py)",
        "rows": [],
    }
    chosen = (
        [r for group in ROWS.values() for r in group] if args.rows == "all" else ROWS[args.rows]
    )
    if args.pick:
        wrong = [i for i in args.pick if not 0 <= i < len(chosen)]
        if wrong:
            parser.error(f"--pick {wrong}: --rows {args.rows} has rows 0 to {len(chosen) - 1}")
        chosen = [chosen[i] for i in args.pick]
    for name, batch, seq_len, checkpoint, mode in chosen:
        if time.perf_counter() - started > args.budget:
            results["rows"].append({"attention": name, "batch": batch, "seq_len": seq_len,
                                    "compile_mode": mode,
                                    "skipped": "time budget spent (--budget)"})  # fmt: skip
        else:
            results["rows"].append(row(name, batch, seq_len, checkpoint, mode, rate))
            r = results["rows"][-1]
            print(f"{name:10s} {mode:26s} {batch:5d} x {seq_len:5d} ckpt={checkpoint!s:5s} "
                  f"{r.get('tokens_per_s', 0) / 1e3:8.1f}K tok/s  MFU {r.get('mfu', 0):.3f}  "
                  f"err {r.get('max_error')}  {r.get('error', '')}", flush=True)  # fmt: skip
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
