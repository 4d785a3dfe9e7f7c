"""The levers ablation table of docs/retrieval.md from benchmarks/retention.py records.

    python benchmarks/retention_table.py benchmarks/results/cpu_retention/levers
    python benchmarks/retention_table.py benchmarks/results/cpu_retention/fold_counter \
        --folds 1,7,23,32,33,47,100,300,1024

Reads DIR/<cell>_s<seed>/retention*.json (a training run's record, or records of `--model`
evaluations of its model, merged) and train_summary.json, and prints one markdown row per cell:
recall by distance as "seed 0 / seed 1" ("–": not measured), with the steps trained and the
curriculum level reached.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

FOLDS = (1, 32, 128, 1024, 4096, 32768)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def main(directory: str, folds: tuple[int, ...] = FOLDS) -> None:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for summary_path in sorted(Path(directory).glob("*_s*/train_summary.json")):
        cell, seed = summary_path.parent.name.rsplit("_s", 1)
        records = [json.loads(p.read_text()) for p in summary_path.parent.glob("retention*.json")]
        recall = {n: a for record in records for n, a in record["recall"].items()}
        summary = json.loads(summary_path.read_text())
        runs[cell][int(seed)] = {"recall": recall, "summary": summary}
        trained = records[0]["trained_to_folds"]
    heads = [f"{n:,} ({n // trained}×)" if n >= trained and n % trained == 0
             else f"{n} (1/{trained // n}×)" if trained % n == 0 else f"{n:,} ({n / trained:.3g}×)"
             for n in folds]  # fmt: skip
    print("| cell | " + " | ".join(heads) + " | steps | level |")
    print("|" + " --- |" * (len(folds) + 3))
    for cell, seeds in runs.items():
        ordered = [seeds[s] for s in sorted(seeds)]
        recall = [" / ".join(percent(r["recall"].get(str(n))) for r in ordered) for n in folds]
        steps = " / ".join(str(r["summary"]["steps"]) for r in ordered)
        level = " / ".join(str(r["summary"]["curriculum_level"]) for r in ordered)
        print(f"| {cell} | " + " | ".join(recall) + f" | {steps} | {level} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--folds", default=",".join(map(str, FOLDS)), help="distance columns")
    args = parser.parse_args()
    main(args.directory, tuple(int(n) for n in args.folds.split(",")))
