"""Where in a prompt a passkey model fails (docs/retrieval.md, round 4): accuracy at a fine grid
of depths, for each weight dtype, and over random depths split by whether each copy of the key
in the key sentence crosses a fold boundary.

    PYTHONPATH=src python benchmarks/passkey_positions.py MODEL_DIR --length 1K \
        --depths 0,0.1,0.2,0.25,0.3,0.4,0.5,0.6,0.75,0.9,1 --samples 20 \
        --dtypes float32,bfloat16 --random 300 --out positions.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from foldformer.data.passkey import build_passkey_prompt
from foldformer.evaluate.common import load_checkpoint, parse_size
from foldformer.evaluate.passkey import evaluate_passkey, is_correct
from foldformer.generate import greedy_generate, ingest


def crossing(model, tokenizer, length: int, n: int) -> dict:
    """Accuracy over n random depths, by (first copy crosses a fold, second copy crosses)."""
    w = model.config.segment_len
    prompts = [build_passkey_prompt(tokenizer, length, random.Random(i).random(), seed=i)
               for i in range(n)]  # fmt: skip
    groups: dict[tuple[bool, bool], list[bool]] = {}
    by_length: dict[int, list] = {}
    for p in prompts:
        by_length.setdefault(len(p.ids), []).append(p)
    for group in by_length.values():
        ids = torch.tensor([p.ids for p in group])
        state = ingest(model, ids[:, :-1])
        out = greedy_generate(model, ids[:, -1:], 8, memory=state)
        for p, row in zip(group, out, strict=True):
            sentence = tokenizer.decode(p.ids[p.key_start : p.key_end])
            offsets = [sentence.find(p.key), sentence.rfind(p.key)]  # bytes: chars = tokens
            crosses = tuple(
                (p.key_start + o) // w != (p.key_start + o + len(p.key) - 1) // w for o in offsets
            )
            groups.setdefault(crosses, []).append(is_correct(tokenizer.decode(row.tolist()), p.key))
    return {f"first_crosses={a} second_crosses={b}": {"n": len(v), "accuracy": sum(v) / len(v)}
            for (a, b), v in sorted(groups.items())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--length", default="1K")
    parser.add_argument("--depths", default="0,0.1,0.2,0.25,0.3,0.4,0.5,0.6,0.75,0.9,1")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--random", type=int, default=300, help="random depths (0: skip)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    length, depths = parse_size(args.length), [float(d) for d in args.depths.split(",")]
    record = {"command": "python benchmarks/passkey_positions.py " + " ".join(
                  [args.model, "--length", args.length, "--depths", args.depths, "--samples",
                   str(args.samples), "--dtypes", args.dtypes, "--random", str(args.random)]),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "device": "cpu",
              "by_depth": {}}  # fmt: skip
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_checkpoint(args.model, "cpu", dtype)
        cells = evaluate_passkey(model, tokenizer, [length], depths, args.samples,
                                 batch_size=len(depths) * args.samples, progress=False)  # fmt: skip
        record["by_depth"][dtype] = {str(c.depth): c.accuracy for c in cells}
        print(dtype, record["by_depth"][dtype], flush=True)
    if args.random:
        model, tokenizer = load_checkpoint(args.model, "cpu")
        record["fold_crossing"] = crossing(model, tokenizer, length, args.random)
        print(record["fold_crossing"])
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
