"""`foldformer train`: a run from a preset, a TOML/JSON file and `--key value` overrides.

Every field of the model, train and data configs is an option, listed in `--help` with its type
and default (`--lr FLOAT`; `--train.lr` names the section); values are parsed by type
(foldformer.overrides).
Options of other model types (`--model_type rmt --memory_len 4`) are taken the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from foldformer.cli import parse_overrides
from foldformer.models import MODEL_TYPES
from foldformer.overrides import field_comments, field_types, type_name
from foldformer.presets import PRESETS
from foldformer.train import load_run_config, train
from foldformer.train.config import run_sections

# Options kept from before the fields were options: the same fields, by these names.
ALIASES = {
    "train.max_steps": ["--max-steps"],
    "train.init_from": ["--init-from"],
    "data.train": ["--data"],
    "data.val": ["--val-data"],
}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field, stored as a string under `section.name` and parsed by
    type in load_run_config (so the file, the preset and the command line agree)."""
    sections = run_sections("folded")
    names = [f.name for cls in sections.values() for f in dataclasses.fields(cls)]
    for section, cls in sections.items():
        title = "model (the folded model's fields; other model types take theirs)"
        group = parser.add_argument_group(title if section == "model" else section)
        if section == "model":
            group.add_argument("--model_type", dest="model.model_type",
                               choices=sorted(MODEL_TYPES), default=argparse.SUPPRESS,
                               help="which model (default folded)")  # fmt: skip
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            tp = field_types(cls)[f.name]
            default = f.default_factory() if callable(f.default_factory) else f.default
            listed = type_name(tp).startswith("list")
            # `--train.lr` style reaches load_run_config through the leftover overrides
            flags = ALIASES.get(key, [f"--{f.name}" if names.count(f.name) == 1 else f"--{key}"])
            comment = f": {comments[f.name]}" if f.name in comments else ""
            group.add_argument(
                *flags, dest=key, default=argparse.SUPPRESS, nargs="+" if listed else None,
                metavar=("STR" if listed else type_name(tp).upper().replace(" ", "")),
                help=f"{type_name(tp)}, default {default!r}{comment}",
            )  # fmt: skip


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (single process, or DDP/FSDP under torchrun)",
        description="Train a model: a preset, then CONFIG, then the options below (values "
        "are parsed by type; a bad one is an error naming it).",
    )
    parser.add_argument("config", nargs="?", help="TOML or JSON file with [model], [train], [data]")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset")
    parser.add_argument("--out", default="runs/latest", help="output directory")
    parser.add_argument("--resume", metavar="DIR", help="continue from a run or checkpoint dir")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="let --resume change hyper-parameters (lr, warm-up, ...); recorded in "
        "run_config.json under 'resumes'",
    )
    add_config_options(parser)
    parser.set_defaults(handler=_run_train, accepts_overrides=True, subparser=parser)


def _run_train(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if "." in k}
    overrides = {**parse_overrides(getattr(args, "extra", [])), **given}
    run = load_run_config(args.config, args.preset, overrides)
    summary = train(run, args.out, resume=args.resume, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
