"""Training curves and loss against context for the seed set-up's runs, one PNG.

    python benchmarks/plot_seed.py benchmarks/results/h200/seed_round3 [--out FILE.png]

Reads RUN/metrics.jsonl (training and validation loss) and RUN/ecl.json (loss_at_context
records, and loss_at_unrelated_context from `eval ecl --control`, drawn dashed) for every run
folder under the results directory, as written by benchmarks/gpu_seed_all.sh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, help="default: RESULTS/seed.png")
    args = parser.parse_args()
    runs = sorted(p for p in args.results.iterdir() if (p / "metrics.jsonl").is_file())
    if not runs:
        raise SystemExit(f"no run folders with metrics.jsonl under {args.results}")
    fig, (train_ax, context_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        metrics = read_jsonl(run / "metrics.jsonl")
        steps = [(m["tokens"] / 1e6, m["loss"]) for m in metrics if "loss" in m]
        if not steps:  # e.g. a run that failed before its first logged step
            continue
        val = [(m["tokens"] / 1e6, m["val_loss"]) for m in metrics if "val_loss" in m]
        color = None
        if steps:
            (line,) = train_ax.plot([s[0] for s in steps], [s[1] for s in steps],
                                    label=f"{run.name} train")  # fmt: skip
            color = line.get_color()
        if val:
            train_ax.plot([v[0] for v in val], [v[1] for v in val], "o--", color=color,
                          label=f"{run.name} validation")  # fmt: skip
        ecl_file = run / "ecl.json"
        if ecl_file.is_file():
            records = json.loads(ecl_file.read_text())
            points = sorted(
                (r["config"]["eval"]["distance"], r["value"], *r["interval"])
                for r in records
                if r["metric"] == "loss_at_context"
            )
            ecl = next((r for r in records if r["metric"] == "ecl"), None)
            d = [max(p[0], 1) for p in points]  # d = 0 drawn at 1 on the log axis
            label = run.name + (f" (ECL {ecl['value']})" if ecl else "")
            bars = context_ax.errorbar(d, [p[1] for p in points],
                                       yerr=[[p[1] - p[2] for p in points],
                                             [p[3] - p[1] for p in points]],
                                       marker="o", capsize=2, label=label)  # fmt: skip
            # --control: the same targets after unrelated text of the same length (dashed)
            control = sorted(
                (r["config"]["eval"]["distance"], r["value"])
                for r in records
                if r["metric"] == "loss_at_unrelated_context"
            )
            if control:
                context_ax.plot([max(c[0], 1) for c in control], [c[1] for c in control], "--",
                                color=bars.lines[0].get_color(), alpha=0.7,
                                label=f"{run.name}, unrelated context")  # fmt: skip
    train_ax.set(xlabel="training tokens (millions)", ylabel="loss (nats/token)",
                 title="training and validation loss")  # fmt: skip
    train_ax.set_ylim(top=min(train_ax.get_ylim()[1], 3.0))
    train_ax.legend(fontsize=8)
    context_ax.set_xscale("log")
    context_ax.set(xlabel="tokens of context before the target (0 drawn at 1)",
                   ylabel="loss on the target (nats/token)",
                   title="held-out authors: loss against context (95% intervals)")  # fmt: skip
    context_ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.results / "seed.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
