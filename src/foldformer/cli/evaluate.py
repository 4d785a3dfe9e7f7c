"""Commands: `foldformer eval {ecl,passkey,babilong,lm}`, `foldformer bench memory`,
`foldformer report`. Each evaluation writes JSON records (and a PNG) under --out."""

from __future__ import annotations

import argparse
import importlib
import importlib.util


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG (results/)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda if any)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )


# (command, module, help)
EVALUATIONS = (
    ("ecl", "foldformer.evaluate.ecl", "effective context length on held-out text"),
    ("passkey", "foldformer.evaluate.passkey", "passkey retrieval over lengths and depths"),
    ("babilong", "foldformer.evaluate.babilong", "BABILong question answering accuracy"),
    ("lm", "foldformer.evaluate.lm", "bits per byte, loss by fold position and fold index"),
)


def _lazy(module: str, function: str):
    """Import the evaluation only when its command runs (keeps `foldformer --help` fast)."""

    def handler(args) -> int:
        if getattr(args, "out", None) is not None:  # before the work, not after hours of it
            from pathlib import Path

            from foldformer.train.trainer import check_writable

            check_writable(Path(args.out))
        return getattr(importlib.import_module(module), function)(args)

    return handler


def add_commands(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a checkpoint (DESIGN.md §6)")
    eval_sub = evaluate.add_subparsers(dest="evaluation", metavar="EVALUATION")
    for name, module, help_text in EVALUATIONS:
        if importlib.util.find_spec(module) is None:  # not written yet
            continue
        parser = eval_sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(parser)
        _common(parser)
        parser.set_defaults(handler=_lazy(module, f"{name}_command"))

    bench = subparsers.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    memory = bench_sub.add_parser(
        "memory",
        help="peak memory and tokens/s against sequence length",
        description="Peak memory and tokens/s of streaming inference and one training step "
        "against sequence length, folded against full attention (DESIGN.md §6).",
    )
    importlib.import_module("foldformer.evaluate.memory").add_arguments(memory)
    memory.add_argument("--out", default="results", help="folder for the JSON and PNG")
    memory.add_argument("--device", default="auto", help="cpu, cuda … (auto: cuda if any)")
    memory.set_defaults(handler=_lazy("foldformer.evaluate.memory", "memory_command"))

    report = subparsers.add_parser(
        "report",
        help="Markdown table of result records",
        description="Turn JSON result records (files or folders) into one Markdown table.",
    )
    report.add_argument("results", nargs="+", help="JSON files or folders of them")
    report.add_argument("--metric", nargs="*", help="only these metrics")
    report.add_argument("--out", default=None, help="write the table here instead of stdout")
    report.set_defaults(handler=_report)


def _report(args) -> int:
    """A file that is not a result record (a run's config.json, say) is one line naming it."""
    from foldformer.config import ConfigError
    from foldformer.evaluate.records import report_command

    try:
        return report_command(args)
    except ValueError as error:
        raise ConfigError(
            f"{error} (report reads result records: what `foldformer eval`, `bench` and "
            "`compare` write)"
        ) from None
