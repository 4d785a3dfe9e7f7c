"""Passkey accuracy by the number of folds in the prompt (docs/retrieval.md, "the fold counter").

    PYTHONPATH=src python benchmarks/passkey_folds.py MODEL_DIR --out OUT.json \\
        [--folds 4,5,6,7,8,9,12,15,16,17,24,31,32,33,48,63,64,65] [--depths 0,0.5,1] \\
        [--samples 10] [--minus TOKENS]

`foldformer.evaluate.passkey.evaluate_passkey` (the code of `foldformer eval passkey`) at
prompts of n · w tokens for every n given, on the CPU by default: whether a model answers at
fold counts its curriculum never trained on (the passkey curriculum trains at 1, 2, 4, … folds
and mixes in lower levels only, unless `uniform=true`). `--minus K`: prompts of n · w - K
tokens instead, which moves the question within its fold; each row records how many prompts'
answers straddle a fold boundary (docs/retrieval.md, "answers across a fold").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from foldformer.evaluate.common import load_checkpoint, parse_list
    from foldformer.evaluate.passkey import evaluate_passkey

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", default="4,5,6,7,8,9,12,15,16,17,24,31,32,33,48,63,64,65")
    parser.add_argument("--depths", default="0,0.5,1")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minus", type=int, default=0, help="prompts of n * w - MINUS tokens")
    args = parser.parse_args(argv)
    folds = parse_list(args.folds)
    depths = [float(d) for d in args.depths.split(",")]  # parse_list reads integers
    model, tokenizer = load_checkpoint(args.model, args.device)
    w = model.config.segment_len
    if not 0 <= args.minus < min(folds) * w:
        raise SystemExit(f"--minus {args.minus}: must be >= 0 and below the shortest prompt "
                         f"({min(folds)} folds, {min(folds) * w} tokens)")  # fmt: skip
    started, rows = time.time(), []
    with torch.no_grad():
        for n in folds:
            tokens = n * w - args.minus
            cells = evaluate_passkey(model, tokenizer, [tokens], depths, samples=args.samples,
                                     seed=args.seed, progress=False)  # fmt: skip
            row = {"folds": n, "tokens": tokens, "level": n & (n - 1) == 0}
            row.update({f"depth_{c.depth:g}": c.accuracy for c in cells})
            # the fraction of the row's prompts whose answer crosses a fold boundary
            row["straddling"] = sum(c.straddling or 0 for c in cells) / sum(
                c.samples for c in cells
            )
            rows.append(row)
            print(f"{n:>5} folds {'(a level)' if row['level'] else '         '} "
                  + ("straddling " if row["straddling"] else "           ")
                  + "  ".join(f"{c.depth:g}: {c.accuracy:.0%}" for c in cells), flush=True)  # fmt: skip
    record = {
        "benchmark": "passkey by fold count (benchmarks/passkey_folds.py)",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model": args.model,
        "segment_len": w,
        "samples": args.samples,
        "minus": args.minus,
        "seed": args.seed,
        "device": args.device,
        "seconds": time.time() - started,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
