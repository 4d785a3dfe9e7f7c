"""`foldformer compare CONFIG`: train and evaluate baselines side by side."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import torch

from foldformer.cli import parse_overrides
from foldformer.compare import load_compare_config, run_comparison
from foldformer.config import ConfigError
from foldformer.evaluate.common import resolve_device


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train and evaluate baselines side by side at matched size",
        description="Train every model listed in CONFIG on the same data and token budget at "
        "matched non-embedding parameters (±10%), run ECL, passkey, bits per byte and "
        "memory/speed on each, and write results.json, results.md and plots.",
    )
    parser.add_argument(
        "config", help="TOML (or JSON) file: [model] [compare] [train] [data] [eval]"
    )
    parser.add_argument("--out", default="results/compare", help="output folder")
    parser.add_argument(
        "--models", help="comma-separated subset, e.g. folded,rmt (default: CONFIG's)"
    )
    parser.add_argument("--data", nargs="+", metavar="SPEC", help="training data specs")
    parser.add_argument("--val-data", nargs="+", metavar="SPEC", help="validation data specs")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CONFIG's train.device)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. train.max_steps=100 or overrides.rmt.memory_len=8 "
        "(also as train's syntax: --train.max_steps 100)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: small models run fastest on one thread)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_compare, accepts_overrides=True, subparser=parser)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (recorded in results.json and results.md)."""
    parts = ["foldformer", "compare", args.config, "--out", args.out]
    if args.models:
        parts += ["--models", args.models]
    for flag, specs in (("--data", args.data), ("--val-data", args.val_data)):
        if specs:
            parts += [flag, *specs]
    if args.device:
        parts += ["--device", args.device]
    for item in args.set:
        parts += ["--set", item]
    parts += getattr(args, "extra", [])
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return shlex.join(str(p) for p in parts)


def _run_compare(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:  # torch.set_num_threads raises on it
        raise ConfigError(f"--threads {args.threads}: give a positive number of CPU threads")
    if args.device:
        resolve_device(args.device, "train.device ")  # a device not here, before any work
    overrides: dict[str, Any] = parse_overrides(getattr(args, "extra", []))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not SECTION.KEY=VALUE")
        overrides[key.strip()] = value
    if args.models:
        overrides["compare.models"] = [m for m in args.models.split(",") if m]
    if args.data:
        overrides["data.train"] = list(args.data)
    if args.val_data:
        overrides["data.val"] = list(args.val_data)
    if args.device:
        overrides["train.device"] = args.device
    if args.no_progress:
        overrides["train.progress"] = False
    config = load_compare_config(args.config, overrides)
    command = command_line(args)
    device = config.train.device
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif on_cpu:
        torch.set_num_threads(1)
    run_comparison(config, args.out, command=command, progress=config.train.progress)
    return 0
