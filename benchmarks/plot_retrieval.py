"""Figures of docs/retrieval.md from the committed records.

    python benchmarks/plot_retrieval.py    # writes the six figures below in docs/

Reads benchmarks/results/cpu_retention/*/retention.json (benchmarks/retention.py) for
docs/retrieval_diagnosis.png; benchmarks/results/h200/retrieval/round3/passkey_*/eval_*/passkey.json
(retrieval_gpu.sh) for docs/passkey_h200.png; round5/clamp_st_mixed/passkey_N.json
(passkey_round5.sh, then passkey_gpu.py --eval-only for 4M and 16M) for
docs/passkey_round5_h200.png; round7/scratch/eval/passkey_N.json (passkey_round7.sh, then
--eval-only for 4M and 16M) for docs/passkey_round7_h200.png; benchmarks/results/h200/babilong/*/babilong.json
(babilong_gpu.py) for docs/babilong_h200.png; babilong/round8/*/babilong.json for
docs/babilong_round8_h200.png; babilong/round9/*/*/babilong.json (with round 8's) for
docs/babilong_round9_h200.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from foldformer.evaluate.common import format_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "benchmarks" / "results" / "cpu_retention"
H200 = ROOT / "benchmarks" / "results" / "h200" / "retrieval" / "round3"
GATES = (("plain", "plain fold (the note)", "k:"), ("sigmoid", "sigmoid gate", "C0s-"),
         ("hardsigmoid", "hardsigmoid gate", "C2^-"), ("clamp_st", "clamp_st gate", "C3o-"))  # fmt: skip
SIZES = ("1K", "16K", "128K", "1M", "4M", "16M")


def recall_by_distance(gate: str) -> dict[int, float]:
    recall: dict[int, float] = {}
    for name in (gate, f"{gate}_far"):
        path = CPU / name / "retention.json"
        if path.is_file():
            recall.update({int(k): v for k, v in json.loads(path.read_text())["recall"].items()})
    return dict(sorted(recall.items()))


def diagnosis(path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for gate, label, style in GATES:
        recall = recall_by_distance(gate)
        if not recall:
            continue
        axes[0].plot(list(recall), list(recall.values()), style, label=label, ms=4)
        followed = json.loads((CPU / gate / "retention.json").read_text())["followed"]
        folds = followed["fold"]
        axes[1].plot(folds, followed["probe"], style[:-1] + "-", label=label, ms=0)
        axes[2].plot(folds, followed["norm"], style[:-1] + "-", label=label, ms=0)
        if "gate_held" in followed:
            axes[3].plot(
                folds, followed["gate_mean"], style[:2] + "--", lw=1, label=f"{label}: mean g"
            )
            axes[3].plot(
                folds, followed["gate_held"], style[:2] + "-", label=f"{label}: share g = 1"
            )
    axes[0].axvline(32, color="grey", lw=0.8, ls=":")
    axes[0].set(
        xscale="log",
        xlabel="distance key → question (folds of w = 8)",
        ylabel="recall (exact 3 digits)",
        title="recall (trained to 32 folds, dotted)",
    )
    axes[1].set(
        xscale="log",
        xlabel="folds after the key",
        ylabel="probe accuracy (first digit)",
        title="is the key still in the memory?",
        ylim=(0, 1.02),
    )
    axes[2].set(
        xscale="log",
        xlabel="folds after the key",
        ylabel="mean memory row norm",
        title="memory norm",
    )
    axes[3].set(
        xscale="log",
        xlabel="folds after the key",
        ylabel="gate value",
        title="gate: mean and share held exactly",
        ylim=(-0.02, 1.02),
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passkey(path: Path) -> None:
    runs = sorted(p for p in H200.glob("passkey_*") if p.is_dir())
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        sizes = [s for s in SIZES if (run / f"eval_{s}" / "passkey.json").is_file()]
        depths, grid = None, []
        for size in sizes:
            records = json.loads((run / f"eval_{size}" / "passkey.json").read_text())
            cells = {r["config"]["eval"]["depth"]: r["value"] for r in records
                     if r["metric"] == "passkey_accuracy"}  # fmt: skip
            depths = sorted(cells)
            grid.append([cells[d] for d in depths])
        grid = np.array(grid).T
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=9)
        ax.set(xlabel="prompt length (tokens)", ylabel="key depth",
               title=f"{run.name.removeprefix('passkey_')} gate, trained ≤ 2K tokens")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passkey_grid(path: Path, run: Path, title: str) -> None:
    """One model's §6 grid from the passkey_LENGTH.json records in `run` (passkey_gpu.py)."""
    from foldformer.evaluate.passkey import PasskeyCell, plot_passkey

    cells = [PasskeyCell(r["config"]["eval"]["length"], r["config"]["eval"]["depth"],
                         r["extra"]["correct"], r["extra"]["samples"], [])
             for f in sorted(run.glob("passkey_*.json")) for r in json.loads(f.read_text())
             if r["metric"] == "passkey_accuracy"]  # fmt: skip
    plot_passkey(cells, path, title)


BABILONG = H200.parent.parent / "babilong"


def accuracy_by_length(results: list[dict], model: str, task: str = "qa1") -> dict[int, float]:
    """{length: accuracy} of one model and task over babilong_gpu.py results (several calls)."""
    return {c["length"]: c["accuracy"] for r in results if (r["task"], r["model"]) == (task, model)
            for c in r["cells"] if "accuracy" in c}  # fmt: skip


def accuracy_panel(ax, lines: list[tuple[str, str, dict[int, float]]], title: str) -> None:
    """One line per (label, style, {length: accuracy}), lengths evenly spaced."""
    lengths = sorted({n for _, _, cells in lines for n in cells})
    for label, style, cells in lines:
        xs = [i for i, n in enumerate(lengths) if n in cells]
        ax.plot(xs, [cells[lengths[i]] for i in xs], style, label=label)
    ax.set_xticks(range(len(lengths)), [format_size(n) for n in lengths])
    ax.set(ylim=(-0.02, 1.02), xlabel="context length (tokens)", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)


def results_of(*folders: str) -> list[dict]:
    return [r for folder in folders
            for r in json.loads((BABILONG / folder / "babilong.json").read_text())["results"]]  # fmt: skip


def babilong(path: Path) -> None:
    """Accuracy against length, a panel per task, a line per model (the 10M cell of qa1 is the
    folded model's only, from a later call on the same weights)."""
    results = results_of(*sorted(f.parent.name for f in BABILONG.glob("qa*/babilong.json")))
    tasks = sorted({r["task"] for r in results})
    styles = {"folded": "C3o-", "rmt": "C0s-", "no_memory": "k^:"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lines = [(m, style, accuracy_by_length(results, m, task)) for m, style in styles.items()]
        accuracy_panel(ax, lines, f"BABILong {task} (100 questions a point)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def babilong_round8(path: Path) -> None:
    """qa1 in round 8 (round8/README.md): one line per model, its cells from every call that
    evaluated it (call 3 asked call 2's folded model at 10M and its RMT at 1M)."""
    call2_and_3 = results_of("round8/call2_permute", "round8/call3_long/folded_10M",
                             "round8/call3_long/rmt_1M")  # fmt: skip
    continued, call1 = results_of("round8/call4_continued"), results_of("round8/call1_memorised")
    lines = [("folded, 7 min", "C3o-", accuracy_by_length(call2_and_3, "folded")),
             ("folded, 7 + 4 min", "C1D-", accuracy_by_length(continued, "folded_init")),
             ("RMT, 7 min", "C0s-", accuracy_by_length(call2_and_3, "rmt")),
             ("no memory, 7 min", "k^:", accuracy_by_length(call2_and_3, "no_memory")),
             ("folded, 6.5 min, without permute", "C3o:", accuracy_by_length(call1, "folded"))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8.6, 3.8))
    accuracy_panel(ax, lines, "BABILong qa1, round 8 (trained ≤ 8K tokens, 100 questions a point)")
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def babilong_round9(path: Path) -> None:
    """Round 8's recipe on every task (round9/README.md): a panel per task, a line per model;
    qa1 from round 8 (call 2, matched; call 4's model, whose 10M cell is round 9's call A),
    qa4 at the curriculum's default threshold (0.9) and at 0.7."""
    qa1 = results_of("round8/call2_permute", "round8/call3_long/folded_10M",
                     "round8/call3_long/rmt_1M")  # fmt: skip
    # call A asked call 4's folded model (there named `folded`) at 10M
    qa1_continued = results_of("round8/call4_continued") + [
        {**r, "model": "folded_init"}
        for r in results_of("round9/callA/qa1_10M") if r["model"] == "folded"]  # fmt: skip
    qa1 += [r for r in results_of("round9/callA/qa1_10M") if r["model"] == "no_memory"]
    qa2_qa4, qa5 = results_of("round9/callB/qa2_qa4"), results_of("round9/callC/qa5")
    qa4_07 = results_of("round9/callC/qa4_threshold07")
    panels = {
        "qa1": [("folded, 7 min", "C3o-", accuracy_by_length(qa1, "folded")),
                ("folded, 7 + 4 min", "C1D-", accuracy_by_length(qa1_continued, "folded_init")),
                ("RMT", "C0s-", accuracy_by_length(qa1, "rmt")),
                ("no memory", "k^:", accuracy_by_length(qa1, "no_memory"))],
        "qa2": [(label, style, accuracy_by_length(qa2_qa4, m, "qa2"))
                for label, style, m in (("folded", "C3o-", "folded"), ("RMT", "C0s-", "rmt"),
                                        ("no memory", "k^:", "no_memory"))],
        "qa4": [("folded, threshold 0.7", "C3o-", accuracy_by_length(qa4_07, "folded", "qa4")),
                ("RMT, threshold 0.7", "C0s-", accuracy_by_length(qa4_07, "rmt", "qa4")),
                ("no memory, threshold 0.7", "k^:", accuracy_by_length(qa4_07, "no_memory", "qa4")),
                ("folded, threshold 0.9", "C3o:", accuracy_by_length(qa2_qa4, "folded", "qa4"))],
        "qa5": [(label, style, accuracy_by_length(qa5, m, "qa5"))
                for label, style, m in (("folded", "C3o-", "folded"), ("RMT", "C0s-", "rmt"),
                                        ("no memory", "k^:", "no_memory"))],
    }  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (task, lines) in zip(axes, panels.items(), strict=True):
        accuracy_panel(ax, lines, f"BABILong {task}, rounds 8-9")
        if task == "qa1":
            ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    fig.suptitle("trained ≤ 8K tokens, 100 questions a point, one H200", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    diagnosis(ROOT / "docs" / "retrieval_diagnosis.png")
    passkey(ROOT / "docs" / "passkey_h200.png")
    passkey_grid(
        ROOT / "docs" / "passkey_round5_h200.png",
        H200.parent / "round5" / "clamp_st_mixed",
        "passkey, round 5 clamp_st (trained ≤ 8K tokens), one H200",
    )
    passkey_grid(
        ROOT / "docs" / "passkey_round7_h200.png",
        H200.parent / "round7" / "scratch" / "eval",
        "passkey, round 7 from scratch (trained ≤ 16K tokens), one H200",
    )
    babilong(ROOT / "docs" / "babilong_h200.png")
    babilong_round8(ROOT / "docs" / "babilong_round8_h200.png")
    babilong_round9(ROOT / "docs" / "babilong_round9_h200.png")
    print(
        "wrote docs/retrieval_diagnosis.png, passkey_h200.png, passkey_round5_h200.png, "
        "passkey_round7_h200.png, babilong_h200.png, babilong_round8_h200.png, "
        "babilong_round9_h200.png"
    )
