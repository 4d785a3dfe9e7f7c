"""The `foldformer` command.

Each command group lives in its own module and registers itself through a function
``add_commands(subparsers)``; this file only assembles them. All argparse code lives in
this package.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from foldformer import __version__
from foldformer.config import ConfigError

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "foldformer.cli.train",
    "foldformer.cli.evaluate",
    "foldformer.cli.demo",
    "foldformer.cli.compare",
    "foldformer.cli.data",
    "foldformer.cli.generate",
    "foldformer.cli.serve",
    "foldformer.cli.explain",
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


def split_overrides(
    argv: list[str], subparser: argparse.ArgumentParser
) -> tuple[list[str], list[str]]:
    """Take `--key value` pairs the subcommand does not declare out of argv: config overrides."""
    known = set(subparser._option_string_actions)
    kept, overrides = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token.startswith("--") and name not in known:
            has_value = "=" in token or i + 1 >= len(argv)
            overrides.extend(argv[i : i + (1 if has_value else 2)])
            i += 1 if has_value else 2
        else:
            kept.append(token)
            i += 1
    return kept, overrides


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs left over by argparse: config overrides, the one
    syntax of `train` and `compare` (values parsed by type in foldformer.overrides)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)
    extra: list[str] = []
    if getattr(args, "accepts_overrides", False):
        argv, extra = split_overrides(argv, args.subparser)
    args = parser.parse_args(argv)
    args.extra = extra
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    result = args.handler(args)
    return int(result or 0)


def console(argv: list[str] | None = None) -> int:
    """The `foldformer` command: `main`, with mistakes in the input (a bad config value, a
    missing file, data or peer) reported as one line instead of a traceback. Set
    FOLDFORMER_DEBUG=1 for the traceback."""
    import os

    from foldformer.compare import CompareError
    from foldformer.config import ConfigError
    from foldformer.data.text import DataError
    from foldformer.variants.peers import PeerUnavailableError

    user_errors = (ConfigError, DataError, CompareError, PeerUnavailableError, FileNotFoundError)
    try:
        return main(argv)
    except user_errors as error:
        if os.environ.get("FOLDFORMER_DEBUG"):
            raise
        print(f"foldformer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # Ctrl-C; a training run says where it saved
        if os.environ.get("FOLDFORMER_DEBUG"):
            raise
        print(f"\nfoldformer: {str(error) or 'interrupted'}", file=sys.stderr)
        return 130
