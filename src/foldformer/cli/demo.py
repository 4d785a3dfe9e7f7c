"""`foldformer demo`: folded vs no-memory models on key recall (CPU, minutes)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from foldformer import __version__, demo
from foldformer.demo import plot, print_table, run_demo, verdict


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train folded vs no-memory models on recall and measure it by distance (CPU, minutes)",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--max-minutes", type=float, default=6.0,
                        help="training time budget per model")  # fmt: skip
    parser.add_argument("--samples", type=int, default=256, help="evaluation samples per distance")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Tiny models gain nothing from intra-op threads, and threads that spin on a busy machine
    # slow them down many times over.
    torch.set_num_threads(1)
    started = time.time()
    out = Path(args.out)
    records = run_demo(out, args.seed, args.max_steps, args.max_minutes, args.samples)
    (out / "demo.json").write_text(json.dumps(records, indent=2) + "\n")
    plot(records, out / "demo.png")
    print_table(records)
    ok, message = verdict(records)
    print(message)
    meta = {
        "foldformer": __version__,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpus": torch.get_num_threads(),
        "seed": args.seed,
        "total_seconds": round(time.time() - started, 1),
        "target_met": ok,
    }
    (out / "demo_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'demo.json'}, {out / 'demo.png'} ({meta['total_seconds']:.0f} s in all)")
    return 0
