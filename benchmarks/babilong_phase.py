"""BABILong accuracy with the question ending on a fold boundary or inside a fold
(docs/retrieval.md, "answers across a fold").

    PYTHONPATH=src python benchmarks/babilong_phase.py --pg PG_ARCHIVE --babi BABI_DIR \\
        --out OUT.json MODEL_DIR [MODEL_DIR ...] [--task qa1] [--lengths 4K,16K] \\
        [--shifts 0,64] [--samples 100]

The evaluation of `benchmarks/babilong_gpu.py` (held-out questions: the last 10% of the task's
bAbI train file; background from the pg validation authors; every prompt exactly its length, so
one length is one batch; greedy answer, first word against the answer), at prompts of
n - shift tokens for every length n and shift given. At shift 0 a prompt of a multiple of the
segment length w ends on the last token of a fold: the answer's first token is predicted inside
the fold and the rest after it, with the question in memory only, so every answer straddles a
fold boundary. A shift of w / 2 puts the question's end inside a fold. Each cell records the
fraction of prompts whose answer straddles (`foldformer.data.passkey.answer_straddles`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from foldformer.data.babilong import (
        TokenizedBackground,
        babi_file,
        load_babi,
        load_background,
        split_babi,
    )
    from foldformer.data.passkey import answer_straddles
    from foldformer.evaluate.babilong import build_eval_samples, evaluate_babilong
    from foldformer.evaluate.common import load_checkpoint, parse_list, wilson_interval

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories (one tokenizer for all)")
    parser.add_argument("--pg", required=True, help="pg.tar.xz (or any books spec taking ?split=)")
    parser.add_argument("--babi", required=True, help="bAbI directory holding qaN_*_train.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="qa1")
    parser.add_argument("--lengths", default="4K,16K")
    parser.add_argument("--shifts", default="0,64")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    lengths, shifts = parse_list(args.lengths), parse_list(args.shifts)
    started = time.time()
    _, held_out = split_babi(load_babi(babi_file(args.task, args.babi)))
    loaded = [load_checkpoint(m, args.device) for m in args.models]
    tokenizer = loaded[0][1]
    background = TokenizedBackground(load_background(f"{args.pg}?split=validation"), tokenizer)
    prompts = {  # the same prompts for every model
        (n, s): build_eval_samples(
            held_out, background, [n - s], args.samples, tokenizer, seed=args.seed, exact=True
        )  # fmt: skip
        for n in lengths
        for s in shifts
    }
    cells = []
    with torch.no_grad():
        for path, (model, _) in zip(args.models, loaded, strict=True):
            w = model.config.segment_len
            for (n, s), examples in prompts.items():
                t0 = time.time()
                (cell,) = evaluate_babilong(model, tokenizer, examples, batch_size=args.samples,
                                            progress=False)  # fmt: skip
                straddling = sum(
                    answer_straddles(len(e.input_ids), len(e.answer_ids), w)
                    for e in examples[n - s]
                ) / len(examples[n - s])  # fmt: skip
                cells.append({
                    "model": path, "segment_len": w, "length": n, "shift": s,
                    "tokens": n - s, "accuracy": cell.accuracy, "correct": cell.correct,
                    "n": cell.samples, "interval": wilson_interval(cell.correct, cell.samples),
                    "straddling": straddling, "seconds": time.time() - t0,
                    "examples": cell.outputs[:5],
                })  # fmt: skip
                print(f"{Path(path).name} {n} - {s}: {cell.accuracy:.0%} "
                      f"(answers straddling a fold: {straddling:.0%})", flush=True)  # fmt: skip
    record = {
        "benchmark": "BABILong by the question's place in its fold (benchmarks/babilong_phase.py)",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "task": args.task,
        "samples": args.samples,
        "seed": args.seed,
        "device": args.device,
        "seconds": time.time() - started,
        "cells": cells,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
