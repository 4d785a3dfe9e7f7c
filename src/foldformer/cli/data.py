"""`foldformer tokenizer ...` commands."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from foldformer.data.tokenizers import train_bpe

    options = {}
    if args.strip_gutenberg is not None:
        options["strip_gutenberg"] = args.strip_gutenberg == "true"
    tokenizer = train_bpe(
        args.files,
        vocab_size=args.vocab_size,
        output_path=args.output,
        progress=not args.quiet,
        min_frequency=args.min_frequency,
        errors=args.errors,
        **options,
    )
    print(f"wrote {args.output}: byte-level BPE, vocab_size={tokenizer.vocab_size}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from foldformer.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(args.text)
    print(" ".join(map(str, ids)))
    print(f"{len(ids)} tokens, {len(args.text.encode('utf-8'))} bytes")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or try a tokenizer")
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    train = commands.add_parser(
        "train",
        help="train a byte-level BPE tokenizer.json with Hugging Face tokenizers",
        description="Train a byte-level BPE tokenizer. FILES are data specs: files, "
        "directories, .jsonl/.parquet, tar archives, hf:NAME, with ?options (see docs/data.md), "
        "e.g. ../shared/data/pg.tar.xz?split=train",
    )
    train.add_argument("files", nargs="+", metavar="FILES", help="data specs to train on")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (>= 257)")
    train.add_argument("-o", "--output", required=True, help="where to write tokenizer.json")
    train.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge")
    train.add_argument(
        "--strip-gutenberg",
        choices=["true", "false"],
        default=None,
        help="force Project Gutenberg header stripping on/off (default: detect)",
    )
    train.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="non-UTF-8 bytes: fail naming the file (strict) or decode with U+FFFD (replace)",
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    encode = commands.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("text")
    encode.add_argument("--tokenizer", default="bytes", help="'bytes', tokenizer.json or a dir")
    encode.set_defaults(handler=_encode)
