"""The levers ablation table of docs/retrieval.md from benchmarks/retention.py records.

    python benchmarks/retention_table.py benchmarks/results/cpu_retention/levers

Reads DIR/<cell>_s<seed>/retention.json and train_summary.json and prints one markdown row per
cell: recall by distance as "seed 0 / seed 1", with the steps trained and the curriculum level
reached.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

FOLDS = (1, 32, 128, 1024, 4096, 32768)


def main(directory: str) -> None:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(Path(directory).glob("*_s*/retention.json")):
        cell, seed = path.parent.name.rsplit("_s", 1)
        summary = json.loads((path.parent / "train_summary.json").read_text())
        runs[cell][int(seed)] = {**json.loads(path.read_text()), "summary": summary}
    trained = runs[next(iter(runs))][0]["trained_to_folds"]
    heads = [f"{n:,} ({n / trained:g}×)" for n in FOLDS]
    print("| cell | " + " | ".join(heads) + " | steps | level |")
    print("|" + " --- |" * (len(FOLDS) + 3))
    for cell, seeds in runs.items():
        ordered = [seeds[s] for s in sorted(seeds)]
        recall = [" / ".join(f"{r['recall'][str(n)]:.0%}" for r in ordered) for n in FOLDS]
        steps = " / ".join(str(r["summary"]["steps"]) for r in ordered)
        level = " / ".join(str(r["curriculum_level_reached"]) for r in ordered)
        print(f"| {cell} | " + " | ".join(recall) + f" | {steps} | {level} |")


if __name__ == "__main__":
    main(sys.argv[1])
