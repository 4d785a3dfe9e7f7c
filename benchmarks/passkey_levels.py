"""Passkey accuracy of a model at curriculum levels, on the training task's own held-out rows
(`foldformer.data.synthetic.PasskeyTask`, n * w tokens, the key at a uniform random depth), to
tell what a model learned on the lengths it was trained on from how it extrapolates.

    PYTHONPATH=src python benchmarks/passkey_levels.py MODEL_DIR [MODEL_DIR ...] \
        --levels 8,16,32 [--samples 64] --out levels.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from foldformer.data.synthetic import PasskeyTask, evaluate_accuracy
from foldformer.evaluate.common import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--levels", default="8,16,32", help="folds per prompt")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    levels = [int(x) for x in args.levels.split(",")]
    results = []
    for path in args.models:
        model, tokenizer = load_checkpoint(path, args.device)
        task = PasskeyTask(batch_size=1, segment_len=model.config.segment_len,
                           tokenizer=tokenizer, n_folds=min(levels))  # fmt: skip
        row = {"model": path, "accuracy": {}}
        for level in levels:
            accuracy = evaluate_accuracy(model, task, level, args.samples, args.samples,
                                         args.device)  # fmt: skip
            row["accuracy"][level] = accuracy
            print(f"{path} level {level}: {accuracy:.1%}", flush=True)
        results.append(row)
    record = {"command": "python benchmarks/passkey_levels.py " + " ".join(
                  [*args.models, "--levels", args.levels, "--samples", str(args.samples)]),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "device": args.device,
              "samples": args.samples, "results": results}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
