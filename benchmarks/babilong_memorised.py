"""Does a BABILong model answer from remembered training stories? Its accuracy on the story
alone (length 0) for questions of the training split against held-out ones (`split_babi`),
the same number of each; a large gap means the model remembers stories rather than reading
them (round 8: docs/retrieval.md).

    PYTHONPATH=src python benchmarks/babilong_memorised.py MODEL_DIR [MODEL_DIR ...] \\
        --babi ../shared/data/babi/en-10k --task qa1 --samples 200 --out memorised.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from foldformer.data.babilong import babi_file, load_babi, split_babi
from foldformer.evaluate.babilong import build_eval_samples, evaluate_babilong
from foldformer.evaluate.common import load_checkpoint, wilson_interval
from foldformer.evaluate.records import hardware


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--babi", required=True)
    parser.add_argument("--task", default="qa1")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    train, held_out = split_babi(load_babi(babi_file(args.task, args.babi)))
    record = {"command": "python benchmarks/babilong_memorised.py " + " ".join(argv),
              "hardware": hardware(args.device),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "task": args.task,
              "samples": args.samples, "seed": args.seed, "models": {}}  # fmt: skip
    for path in args.models:
        model, tokenizer = load_checkpoint(path, args.device)
        cells = {}
        for split, pool in (("train", train), ("held_out", held_out)):
            examples = build_eval_samples(pool, [], [0], args.samples, tokenizer, seed=args.seed)
            (cell,) = evaluate_babilong(model, tokenizer, examples, batch_size=50, progress=False)
            cells[split] = {"accuracy": cell.accuracy, "correct": cell.correct, "n": cell.samples,
                            "interval": wilson_interval(cell.correct, cell.samples)}  # fmt: skip
        record["models"][path] = cells
        print(f"{path}: training questions {cells['train']['accuracy']:.1%}, "
              f"held-out {cells['held_out']['accuracy']:.1%}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
