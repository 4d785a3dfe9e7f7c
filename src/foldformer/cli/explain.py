"""`foldformer explain`: how far back the path amplitude of chosen positions of a text reaches,
through any number of folds (attention rollout carried through the memory; docs/explain.md).

Writes DIR/explain.json (one record per position: its amplitude over tokens 0 … i, summing to
1, and its context horizons), DIR/amplitude.png (amplitude against distance, log-log) and
DIR/explain.html (the text shaded by amplitude, self-contained)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="path-amplitude attribution of positions of a text through the folds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="folded model directory (or a training run's folder)")
    parser.add_argument("--text-file", required=True, metavar="F", help="the text to read")
    parser.add_argument("--positions", nargs="+", type=int, default=[-1], metavar="I",
                        help="token positions to explain, 0-based; negative counts from the "
                             "end (default: -1, the last token)")  # fmt: skip
    parser.add_argument("--heads", choices=("mean", "keep"), default="mean",
                        help="keep: also the amplitude of each head of the last layer")  # fmt: skip
    parser.add_argument("--gate", choices=("channels", "mean"), default="channels",
                        help="a gated memory's mix in the rollout: every channel carried apart "
                             "(exact; the default) or its channel mean per row (d times less "
                             "storage; misses what a holding gate keeps)")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the outputs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    parser.set_defaults(handler=explain_command)


def explain_command(args: argparse.Namespace) -> int:
    from foldformer.config import ConfigError
    from foldformer.evaluate.common import resolve_device
    from foldformer.explain import explain, plot_amplitudes, render_html, text_pieces
    from foldformer.generate import Engine
    from foldformer.train.trainer import check_writable

    text_file = Path(args.text_file)
    if not text_file.is_file():
        raise FileNotFoundError(f"--text-file {args.text_file!r} does not exist")
    out = check_writable(Path(args.out))
    device = resolve_device(args.device)
    engine = Engine.load(args.checkpoint, device=device)
    ids = engine.tokenizer.encode(text_file.read_text(encoding="utf-8", errors="replace"))
    if not ids:
        raise ConfigError(f"--text-file {args.text_file!r} holds no tokens")
    outside = [p for p in args.positions if not -len(ids) <= p < len(ids)]
    if outside:
        raise ConfigError(
            f"--positions {outside[0]} is outside the text: it has {len(ids)} tokens "
            f"(positions 0 … {len(ids) - 1}, or -{len(ids)} … -1 from the end)"
        )
    positions = sorted({p % len(ids) for p in args.positions})
    amplitudes = explain(engine.model, ids, positions, heads=args.heads, gate=args.gate)
    records = [record.to_dict() for record in amplitudes]
    (out / "explain.json").write_text(json.dumps(records) + "\n")
    plot_amplitudes(amplitudes, out / "amplitude.png")
    (out / "explain.html").write_text(
        render_html(amplitudes, text_pieces(engine.tokenizer, ids)), encoding="utf-8"
    )
    for record in records:
        horizons = ", ".join(f"{share} within {d}" for share, d in record["horizon"].items())
        print(f"position {record['position']}: {horizons} tokens")
    print(f"wrote {out / 'explain.json'}, {out / 'amplitude.png'}, {out / 'explain.html'}")
    return 0
