"""`foldformer train`: a run from a preset, a TOML/JSON file and `--key value` overrides."""

from __future__ import annotations

import argparse
import json
import os

from foldformer.config import ConfigError
from foldformer.train import PRESETS, load_run_config, train


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (single process, or DDP/FSDP under torchrun)",
        description="Train a model. Options not listed below are config fields: --d_model 256, "
        "--segment_len 12, --lr 3e-4 ... (also --train.lr style).",
    )
    parser.add_argument("config", nargs="?", help="TOML or JSON file with [model], [train], [data]")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset")
    parser.add_argument("--data", nargs="+", metavar="SPEC", help="training data specs")
    parser.add_argument("--val-data", nargs="+", metavar="SPEC", help="validation data specs")
    parser.add_argument("--out", default="runs/latest", help="output directory")
    parser.add_argument("--max-steps", type=int, help="number of optimizer steps")
    parser.add_argument("--resume", metavar="DIR", help="continue from a run or checkpoint dir")
    parser.set_defaults(handler=_run_train, accepts_overrides=True, subparser=parser)


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs left over by argparse."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}: overrides are --key value")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"option {item} needs a value")
            key, value = item[2:], extra[i + 1]
            i += 2
        overrides[key] = value
    return overrides


def _run_train(args: argparse.Namespace) -> int:
    overrides = parse_overrides(getattr(args, "extra", []))
    if args.max_steps is not None:
        overrides["max_steps"] = str(args.max_steps)
    run = load_run_config(args.config, args.preset, overrides)
    if args.data:
        run.data.train = list(args.data)
    if args.val_data:
        run.data.val = list(args.val_data)
    summary = train(run, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
