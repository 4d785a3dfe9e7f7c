"""Peak memory and speed against sequence length (DESIGN.md §6, "Memory and speed").

Two workloads per model and length T (batch B):

* inference: stream T tokens through the model with `generate.ingest` (no logits kept);
* training: one forward + backward over T tokens with per-fold activation checkpointing.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (after `reset_peak_memory_stats`); on a
CPU the peak resident set size of the process during the work, measured on Linux by resetting
the kernel's high-water mark (``/proc/self/clear_refs``) after returning freed heap memory to
the system (``malloc_trim``), so each point starts from what is really live; elsewhere each
point runs in a fresh subprocess and reports its own peak (``VmHWM`` where /proc exists,
``ru_maxrss`` elsewhere). Reported: the peak and the
peak minus the baseline before the work (weights and interpreter excluded).

On CUDA also model FLOP utilisation, under the convention of `foldformer.evaluate.flops`
(stated in every record).
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foldformer.config import FoldedConfig
from foldformer.evaluate.common import (
    EvaluationError,
    format_size,
    new_figure,
    print_table,
    save_figure,
)
from foldformer.evaluate.flops import CONVENTION, matmul_rate, model_flops_per_token
from foldformer.evaluate.records import make_record, model_config, write_records
from foldformer.generate import ingest

BUILTIN_MODELS = ("folded", "full-attention", "no-memory")


# -- models ------------------------------------------------------------------------------------


def builtin_model(name: str, d_model: int, n_layers: int, window: int, memory: int) -> nn.Module:
    """The small models compared by default: the same shape, folded or not."""
    from foldformer.model import FoldedTransformer

    base = dict(vocab_size=257, d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64))
    if name == "folded":
        config = FoldedConfig(**base, segment_len=window, memory_len=memory)
    elif name == "full-attention":
        config = FoldedConfig(**base, segment_len=10**9, memory_len=0)
    elif name == "no-memory":
        config = FoldedConfig(**base, segment_len=window, memory_len=0)
    else:
        raise ValueError(
            f"unknown built-in model {name!r}; use one of {BUILTIN_MODELS} or a "
            "checkpoint directory"
        )
    torch.manual_seed(0)
    return FoldedTransformer(config)


def load_bench_model(spec: dict[str, Any], device: torch.device) -> nn.Module:
    if spec["kind"] == "checkpoint":
        from foldformer.models import load_model

        return load_model(spec["path"], device=device)
    return builtin_model(
        spec["name"], spec["d_model"], spec["n_layers"], spec["window"], spec["memory"]
    ).to(device)


# -- CPU peak memory ---------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def can_reset_cpu_peak() -> bool:
    """True on Linux where the peak RSS of this process can be reset (clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def _release_free_memory() -> None:
    # The last point's tensors are young objects: a young-generation collection frees any in
    # reference cycles without the cost of a full collection over everything torch imported.
    gc.collect(1)
    try:  # glibc keeps freed heap pages; give them back so RSS is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: peak and baseline memory (bytes) of the work inside it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark restarts from the current RSS
            self.baseline = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_kib("VmHWM") * 1024


# -- one point ---------------------------------------------------------------------------------


def _work(model: nn.Module, mode: str, ids: torch.Tensor, chunk_size: int | None) -> None:
    if mode == "inference":
        model.eval()
        ingest(model, ids, chunk_size=chunk_size)
    elif mode == "training":
        model.train()
        out = model(ids, labels=ids.roll(-1, dims=1), checkpoint=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_point(
    model: nn.Module,
    mode: str,
    length: int,
    batch_size: int,
    device: torch.device,
    chunk_size: int | None = None,
    measure_memory: bool = True,
) -> dict[str, Any]:
    """Time (and measure the peak memory of) one workload at one length."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, length), generator=generator)
    ids = ids.to(device)
    warm = ids[:, : min(length, 2 * model.config.segment_len, 256)]
    _work(model, mode, warm, chunk_size)  # first-call costs (allocator, kernels) not timed
    result: dict[str, Any] = {}
    if measure_memory:
        with PeakMemory(device) as peak:
            _sync(device)
            start = time.perf_counter()
            _work(model, mode, ids, chunk_size)
            _sync(device)
            seconds = time.perf_counter() - start
        result.update(peak_bytes=peak.peak, baseline_bytes=peak.baseline)
        result["work_bytes"] = max(0, peak.peak - peak.baseline)
    else:
        _sync(device)
        start = time.perf_counter()
        _work(model, mode, ids, chunk_size)
        _sync(device)
        seconds = time.perf_counter() - start
    result.update(seconds=seconds, tokens_per_second=batch_size * length / seconds)
    return result


def _point_in_subprocess(spec: dict[str, Any], mode: str, length: int, batch: int) -> dict:
    """A point in a fresh interpreter: its own peak RSS is that of this work alone (plus the
    interpreter and the model, measured as the baseline before the work)."""
    payload = json.dumps({"spec": spec, "mode": mode, "length": length, "batch": batch})
    proc = subprocess.run(
        [sys.executable, "-m", "foldformer.evaluate.memory", payload],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark point {mode} T={length} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _own_peak_bytes() -> int:
    """This process's peak RSS. On Linux VmHWM: ru_maxrss would also hold the high-water mark
    of the forked parent before exec (the size of whatever launched the point)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):  # no /proc: macOS reports ru_maxrss in bytes
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss * (1 if sys.platform == "darwin" else 1024)


def _subprocess_main(payload: str) -> None:
    args = json.loads(payload)
    model = load_bench_model(args["spec"], torch.device("cpu"))
    baseline = _own_peak_bytes()
    result = run_point(
        model,
        args["mode"],
        args["length"],
        args["batch"],
        torch.device("cpu"),
        measure_memory=False,
    )
    peak = _own_peak_bytes()
    result.update(peak_bytes=peak, baseline_bytes=baseline, work_bytes=max(0, peak - baseline))
    print(json.dumps(result))


# -- the benchmark -----------------------------------------------------------------------------


def model_specs(
    models: Sequence[str], d_model: int, n_layers: int, window: int, memory: int
) -> list[dict[str, Any]]:
    specs = []
    for name in models:
        if name in BUILTIN_MODELS:
            specs.append(
                dict(
                    kind="builtin",
                    name=name,
                    d_model=d_model,
                    n_layers=n_layers,
                    window=window,
                    memory=memory,
                )
            )
        elif Path(name, "config.json").is_file():
            specs.append(dict(kind="checkpoint", name=Path(name).name, path=str(name)))
        else:
            raise EvaluationError(
                f"--models {name!r} is neither a built-in model {BUILTIN_MODELS} nor a checkpoint "
                "directory with a config.json"
            )
    return specs


def bench_memory(
    specs: Sequence[dict[str, Any]],
    lengths: Sequence[int],
    modes: Sequence[str] = ("inference", "training"),
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    isolate: bool | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure every (model, mode, length). Returns one dict per point.

    isolate: run CPU points in subprocesses (default: only where the peak cannot be reset).
    """
    device = torch.device(device)
    if isolate is None:
        isolate = device.type == "cpu" and not can_reset_cpu_peak()
    rate = matmul_rate(device) if device.type == "cuda" else None
    points = []
    for spec in specs:
        # In isolated mode the parent's copy only supplies the config and FLOP counts.
        model = load_bench_model(spec, torch.device("cpu") if isolate else device)
        for mode in modes:
            for length in lengths:
                if isolate:
                    result = _point_in_subprocess(spec, mode, length, batch_size)
                else:
                    result = run_point(model, mode, length, batch_size, device, chunk_size)
                point = dict(
                    model=spec["name"], mode=mode, length=length, batch_size=batch_size, **result
                )
                point["method"] = (
                    "cuda.max_memory_allocated"
                    if device.type == "cuda"
                    else "subprocess peak RSS"
                    if isolate
                    else "VmHWM after clear_refs"
                )
                point["flops_per_token"] = model_flops_per_token(model, mode == "training", length)
                if rate is not None:
                    point["matmul_flops"] = rate
                    point["mfu"] = point["flops_per_token"] * point["tokens_per_second"] / rate
                point["model_config"] = model_config(model)
                points.append(point)
                if progress:
                    print(
                        f"{spec['name']:>16} {mode:>9} T={format_size(length):>6}: "
                        f"{point['work_bytes'] / 2**20:9.1f} MiB over baseline, "
                        f"{point['tokens_per_second']:10.0f} tok/s",
                        file=sys.stderr,
                    )
        del model
    return points


def memory_records(points: Sequence[dict[str, Any]], device, params: dict) -> list[dict]:
    records = []
    for p in points:
        config = {
            "name": p["model"],
            "model": p["model_config"],
            "eval": {**params, "mode": p["mode"], "length": p["length"]},
        }
        extra = {k: v for k, v in p.items() if k != "model_config"}
        records.append(
            make_record(
                "peak_memory_mib",
                p["peak_bytes"] / 2**20,
                None,
                config,
                {**extra, "unit": "MiB"},
                device,
            )
        )
        records.append(
            make_record(
                "work_memory_mib",
                p["work_bytes"] / 2**20,
                None,
                config,
                {**extra, "unit": "MiB", "definition": "peak minus baseline"},
                device,
            )
        )
        records.append(
            make_record("tokens_per_second", p["tokens_per_second"], None, config, extra, device)
        )
        if "mfu" in p:
            records.append(
                make_record(
                    "mfu", p["mfu"], None, config, {**extra, "convention": CONVENTION}, device
                )
            )
    return records


def plot_memory(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        series.setdefault((p["model"], p["mode"]), []).append(p)
    for (name, mode), pts in series.items():
        pts = sorted(pts, key=lambda p: p["length"])
        style = "-" if mode == "inference" else "--"
        x = [p["length"] for p in pts]
        left.plot(
            x,
            [max(p["work_bytes"], 1) / 2**20 for p in pts],
            style,
            marker="o",
            label=f"{name} {mode}",
        )
        right.plot(
            x, [p["tokens_per_second"] for p in pts], style, marker="o", label=f"{name} {mode}"
        )
    for ax, label in ((left, "peak memory over baseline (MiB)"), (right, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    left.set_title("memory")
    right.set_title("speed")
    return save_figure(fig, path)


def memory_command(args) -> int:
    """`foldformer bench memory [--models ...] [--lengths ...]`."""
    from foldformer.evaluate.common import resolve_device
    from foldformer.evaluate.suite import settings_from_flags

    device = resolve_device(args.device)
    settings = settings_from_flags(
        args, {"memory_lengths": "--lengths", "memory_batch_size": "--batch-size"},
        run=["memory"],
        memory_lengths="1K,4K,16K,64K" if device.type == "cuda" else "512,2K,8K",
        memory_modes=["inference", "training"] if args.mode == "both" else [args.mode],
    )  # fmt: skip
    lengths, batch_size = settings.memory_lengths, settings.memory_batch_size
    specs = model_specs(args.models, args.d_model, args.layers, args.window, args.memory)
    points = bench_memory(specs, lengths, settings.memory_modes, batch_size, device,
                          isolate=args.isolate)  # fmt: skip
    params = {"batch_size": batch_size, "lengths": lengths}
    out = Path(args.out)
    path = write_records(memory_records(points, device, params), out / "memory.json")
    plot = plot_memory(points, out / "memory.png")
    header = ["model", "mode", "T", "peak MiB", "over baseline MiB", "tok/s"]
    if device.type == "cuda":
        header.append("MFU")
    rows = []
    for p in points:
        row = [
            p["model"],
            p["mode"],
            format_size(p["length"]),
            f"{p['peak_bytes'] / 2**20:.1f}",
            f"{p['work_bytes'] / 2**20:.1f}",
            f"{p['tokens_per_second']:.0f}",
        ]
        if "mfu" in p:
            row.append(f"{p['mfu']:.1%}")
        rows.append(row)
    print_table(rows, header)
    if device.type == "cuda":
        print(f"MFU convention: {CONVENTION}")
    print(f"wrote {path} and {plot}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=["folded", "full-attention"],
        help=f"checkpoint directories or built-ins {BUILTIN_MODELS}",
    )
    parser.add_argument(
        "--lengths",
        default=None,
        help="sequence lengths (default CPU 512,2K,8K; CUDA 1K,4K,16K,64K)",
    )
    parser.add_argument("--mode", default="both", choices=["both", "inference", "training"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=256, help="built-in models' width")
    parser.add_argument("--layers", type=int, default=4, help="built-in models' depth")
    parser.add_argument("--window", type=int, default=64, help="built-in models' w")
    parser.add_argument("--memory", type=int, default=64, help="built-in folded model's m")
    parser.add_argument(
        "--isolate",
        action="store_true",
        default=None,
        help="run each CPU point in a fresh subprocess",
    )


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
