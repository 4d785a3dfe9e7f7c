"""The `foldformer` command.

Each command group lives in its own module and registers itself through a function
``add_commands(subparsers)``; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from foldformer import __version__

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "foldformer.train",
    "foldformer.evaluate.cli",
    "foldformer.demo",
    "foldformer.compare",
    "foldformer.data.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldformer",
        description="Folded context condensation transformers: train, evaluate, stream, compare.",
    )
    parser.add_argument("--version", action="version", version=f"foldformer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:  # a command group not written yet
            continue
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    result = args.handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
