"""`foldformer demo`: does the memory carry information far beyond the window?

Trains the `tiny` folded model and the same model with m = 0 (no memory) on the built-in
associative-recall task, "# A 123 … ? A" → "123", with a curriculum that doubles the distance
(in folds) whenever the current one is solved, then measures exact-match recall at distances
from 2× to 128× the window. Everything runs on a CPU in minutes on data it generates itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from foldformer.data.synthetic import SyntheticTask, _answer_row, _Row
from foldformer.data.tokenizers import ByteTokenizer
from foldformer.train import load_run_config, train


class KeyRecallTask(SyntheticTask):
    """A 3-digit key opens the sample, random filler follows for `level` folds, then "?" asks
    for the key: "639kdpalgg…hmf?639". Half the batches are at the current curriculum level,
    the rest at a uniformly random shorter distance (so short distances stay learned, and the
    read-out sees every fold count: `uniform`); uniform=False draws them from the lower
    curriculum levels only, 1, 2, 4, … folds. fixed_filler: the filler is the letters in order,
    repeated, the same in every sample (as the passkey's repeated sentences) instead of random
    (both for the ablation of docs/retrieval.md, "the fold counter")."""

    name = "key_recall"

    def __init__(
        self,
        batch_size: int,
        segment_len: int,
        key_len: int = 3,
        mix: float = 0.5,
        uniform: bool = True,
        fixed_filler: bool = False,
        **kwargs: Any,
    ):
        self.key_len, self.fixed_filler = key_len, fixed_filler
        tokenizer = ByteTokenizer()
        self.digits = np.array(tokenizer.encode("0123456789"))
        self.filler = np.array(tokenizer.encode("abcdefghijklmnop"))
        self.query = tokenizer.encode("?")
        super().__init__(batch_size, segment_len, tokenizer=tokenizer, mix=mix, uniform=uniform,
                         **kwargs)  # fmt: skip

    def make_row(self, rng: np.random.Generator, level: int) -> _Row:
        key = rng.choice(self.digits, self.key_len).tolist()
        n = level * self.segment_len - self.key_len
        if self.fixed_filler:  # "abcd…pabc…": the same filler every time, as the passkey's
            filler = np.resize(self.filler, n).tolist()
        else:
            filler = rng.choice(self.filler, n).tolist()
        return _answer_row(key + filler + self.query, key)

    def distance_tokens(self, level: int) -> int:
        return level * self.segment_len  # from the key's first digit to the question


# Distances in folds (= multiples of the window) at which recall is measured.
EVAL_FOLDS = (1, 2, 4, 8, 16, 32, 50, 64, 100, 128)
TARGET_FOLDS, TARGET_ACCURACY = 50, 0.90
MAX_TRAIN_FOLDS = 64


def run_demo(
    out_dir: str | Path,
    seed: int = 0,
    max_steps: int = 2000,
    max_minutes: float = 6.0,
    eval_samples: int = 256,
) -> list[dict[str, Any]]:
    """Train both models, evaluate recall by distance; returns the demo.json records."""
    from foldformer.data.synthetic import evaluate_accuracy
    from foldformer.models import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for name, memory_len in (("folded", None), ("no-memory", 0)):
        overrides = {"max_steps": str(max_steps), "seed": str(seed), "progress": "true",
                     "eval_every": "0", "save_every": "0", "log_every": "25",
                     "max_minutes": str(max_minutes),
                     # constant learning rate, no weight decay: the curriculum sets the pace
                     "warmup_steps": "0", "min_lr_ratio": "1.0", "weight_decay": "0.0",
                     "beta2": "0.999"}  # fmt: skip
        if memory_len is not None:
            overrides["memory_len"] = str(memory_len)
            overrides["memory_gate"] = "false"  # a gate over an empty memory is meaningless
        run = load_run_config(preset="tiny", overrides=overrides)
        w = run.model["segment_len"]
        task = KeyRecallTask(run.train.batch_size, w, max_folds=MAX_TRAIN_FOLDS, seed=seed,
                             window=128)  # fmt: skip
        print(f"\n== training the {name} model (m = {run.model['memory_len']}) ==")
        started = time.time()
        train(run, out_dir / name, batch_source=task)
        train_seconds = time.time() - started
        model = load_model(out_dir / name / "final").eval()
        for n_folds in EVAL_FOLDS:
            accuracy = evaluate_accuracy(
                model, task, n_folds, n_samples=eval_samples, batch_size=64
            )
            records.append({
                "model": name,
                "distance_tokens": task.distance_tokens(n_folds),
                "distance_folds": n_folds,
                "window_tokens": w,
                "accuracy": accuracy,
                "samples": eval_samples,
                "train_seconds": round(train_seconds, 1),
                "seed": seed,
            })  # fmt: skip
    return records


def print_table(records: list[dict[str, Any]]) -> None:
    folds = sorted({r["distance_folds"] for r in records})
    by = {(r["model"], r["distance_folds"]): r for r in records}
    print("\nrecall accuracy (exact match of a 3-digit value) by distance")
    print(f"{'distance':>18} | {'folded':>7} | {'no-memory':>9}")
    for n in folds:
        tokens = by[("folded", n)]["distance_tokens"]
        print(
            f"{n:>4}x window ({tokens:>4} tok) | {by[('folded', n)]['accuracy']:>7.1%} | "
            f"{by[('no-memory', n)]['accuracy']:>9.1%}"
        )
    chance = 1 / 1000
    print(f"chance: {chance:.1%} (one of 1000 values)")


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in (("folded", "o-"), ("no-memory", "s--")):
        rows = [r for r in records if r["model"] == name]
        ax.plot([r["distance_folds"] for r in rows], [r["accuracy"] for r in rows], style,
                label=name)  # fmt: skip
    ax.axvline(TARGET_FOLDS, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance between value and question (multiples of the window w)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("foldformer demo: associative recall across folds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(records: list[dict[str, Any]]) -> tuple[bool, str]:
    folded = {r["distance_folds"]: r["accuracy"] for r in records if r["model"] == "folded"}
    plain = {r["distance_folds"]: r["accuracy"] for r in records if r["model"] == "no-memory"}
    reached = folded[TARGET_FOLDS] >= TARGET_ACCURACY
    at_chance = max(plain.values()) <= 0.05
    message = (
        f"target: folded >= {TARGET_ACCURACY:.0%} at {TARGET_FOLDS}x the window "
        f"(got {folded[TARGET_FOLDS]:.1%}), no-memory at chance "
        f"(max {max(plain.values()):.1%}): " + ("MET" if reached and at_chance else "NOT MET")
    )
    return reached and at_chance, message
