"""Effective context length on real text (DESIGN.md §6).

On held-out documents pick N target windows of 64 tokens, each at least D_max tokens into its
document. For every d in the grid d_0 = 0, d_i = u·2^(i−1) ≤ D_max (u = the model's segment
length w), run the model fresh over only the d tokens before the window and score the window:
loss_d per target. The steps loss_{d_(i−1)} − loss_{d_i} are compared with a paired bootstrap
over targets; ECL is the largest d_i whose step has the lower end of its 95% interval above
zero — the farthest distance at which more context still measurably helps (0 if none does).

Scoring convention: a window's first token is always read (never scored), so each target
contributes the same 63 predictions at every d, including d = 0 where there is nothing before
the window. With d a multiple of w the window starts on a fold boundary of the fresh run, so a
model without memory (m = 0) cannot see before the window at all: its ECL is 0.

Control (`control=True`, `--control`): a recurrent state that starts from its initial value
can lower the loss just by warming up, whatever the context says, and ECL counts that too.
The control scores every window a second time after the same number of tokens taken from
another target's context (another document, or a far part of the same), and reports per d the content gain
loss_d(unrelated) − loss_d(own) with its paired interval: what the context's content is worth
beyond a warmed-up state. (Not part of DESIGN.md's ECL; a diagnostic beside it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from foldformer.evaluate.common import (
    EvaluationError,
    new_figure,
    print_table,
    save_figure,
)
from foldformer.evaluate.records import make_record, write_records
from foldformer.generate import score

WINDOW = 64


# -- the statistics ----------------------------------------------------------------------------


def distance_grid(unit: int, max_distance: int) -> list[int]:
    """[0, u, 2u, 4u, …] up to and including max_distance."""
    if unit < 1:
        raise EvaluationError(f"grid unit must be >= 1, got {unit}")
    if max_distance < unit:
        raise EvaluationError(
            f"max distance {max_distance} is below the grid unit {unit}: the grid would be [0]"
        )
    grid, d = [0], unit
    while d <= max_distance:
        grid.append(d)
        d *= 2
    return grid


def _bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) resampling weights: how often each target is drawn in each resample."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def paired_bootstrap(
    differences: np.ndarray, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> np.ndarray:
    """Percentile intervals of the mean of paired differences, resampling targets.

    differences: (S, N) — S comparisons over the same N targets (one resample of targets is
    shared by all S, as the pairing requires). Returns (S, 2) [low, high].
    """
    differences = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    counts = _bootstrap_counts(differences.shape[1], n_boot, np.random.default_rng(seed))
    means = differences @ counts.T / differences.shape[1]  # (S, n_boot)
    alpha = (1 - confidence) / 2
    return np.quantile(means, [alpha, 1 - alpha], axis=1).T


@dataclass
class ECLResult:
    """ECL, its bootstrap interval and the curve behind it."""

    distances: list[int]
    mean_loss: list[float]  # loss_d, mean over targets (nats per token)
    loss_interval: list[tuple[float, float]]  # 95% bootstrap interval of loss_d
    step_gain: list[float]  # loss_{d_(i-1)} - loss_{d_i}, i >= 1
    step_interval: list[tuple[float, float]]  # 95% paired bootstrap interval of each gain
    ecl: int
    ecl_interval: tuple[int, int]
    n_targets: int
    extra: dict[str, Any] = field(default_factory=dict)


def _ecl_from_lower(distances: Sequence[int], lower: np.ndarray, min_gain: float = 0.0) -> int:
    helped = [d for d, low in zip(distances[1:], lower, strict=True) if low > min_gain]
    return max(helped) if helped else 0


def effective_context_length(
    distances: Sequence[int],
    losses: np.ndarray,
    n_boot: int = 2000,
    n_boot_outer: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    min_gain: float = 0.0,
) -> ECLResult:
    """ECL from per-target losses (G, N) measured at the G distances (DESIGN.md §6).

    ECL = the largest d_i with the lower end of the paired bootstrap interval of
    loss_{d_(i-1)} − loss_{d_i} above zero (0 if no step qualifies). Its own interval is the
    percentile interval of ECL recomputed, with the same rule, on `n_boot_outer` resamples of
    the targets (each with its own inner bootstrap of `n_boot // 4` draws).

    min_gain: require the lower end above this many nats/token instead of above 0. DESIGN.md
    §6 is min_gain = 0; a deterministic model can show gains of ~1e-6 nats that are
    statistically clear and practically nil, and a positive min_gain ignores those.
    """
    losses = np.asarray(losses, dtype=np.float64)
    distances = list(distances)
    if losses.ndim != 2 or losses.shape[0] != len(distances):
        raise ValueError(
            f"losses must have shape (len(distances)={len(distances)}, targets), got {losses.shape}"
        )
    if list(distances) != sorted(set(distances)):
        raise ValueError(f"distances must be strictly increasing, got {distances}")
    n = losses.shape[1]
    if n < 2:
        raise EvaluationError(f"a bootstrap needs at least 2 targets, got {n}")
    gains = losses[:-1] - losses[1:]  # (G-1, N), paired by target
    step_interval = paired_bootstrap(gains, n_boot, confidence, seed)
    loss_interval = paired_bootstrap(losses, n_boot, confidence, seed + 1)
    ecl = _ecl_from_lower(distances, step_interval[:, 0], min_gain)

    # Interval of ECL itself: the whole rule re-run on resampled target sets.
    rng = np.random.default_rng(seed + 2)
    inner = _bootstrap_counts(n, max(50, n_boot // 4), rng)
    alpha = (1 - confidence) / 2
    outer_ecl = []
    for _ in range(n_boot_outer):
        sample = gains[:, rng.integers(0, n, size=n)]
        means = sample @ inner.T / n
        outer_ecl.append(_ecl_from_lower(distances, np.quantile(means, alpha, axis=1), min_gain))
    ecl_interval = (
        int(np.quantile(outer_ecl, alpha, method="lower")),
        int(np.quantile(outer_ecl, 1 - alpha, method="higher")),
    )
    return ECLResult(
        distances=distances,
        mean_loss=losses.mean(axis=1).tolist(),
        loss_interval=[tuple(x) for x in loss_interval.tolist()],
        step_gain=gains.mean(axis=1).tolist(),
        step_interval=[tuple(x) for x in step_interval.tolist()],
        ecl=ecl,
        ecl_interval=ecl_interval,
        n_targets=n,
    )


# -- the measurement ---------------------------------------------------------------------------


def select_targets(
    documents: Sequence[np.ndarray], n_targets: int, max_distance: int, seed: int = 0
) -> list[tuple[int, int]]:
    """(document index, window start) pairs, each start >= max_distance, window inside the doc.

    Starts are drawn uniformly over all valid positions of all documents (seeded), so long
    documents give more targets; windows do not overlap each other.
    """
    valid = [max(0, len(doc) - WINDOW - max_distance + 1) for doc in documents]
    total = sum(valid)
    if total == 0:
        longest = max((len(d) for d in documents), default=0)
        raise EvaluationError(
            f"no document has {max_distance} + {WINDOW} tokens for a target window "
            f"(longest: {longest} tokens); lower --max-distance or give longer documents"
        )
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + valid)
    chosen: list[tuple[int, int]] = []
    taken: dict[int, list[int]] = {}
    # Rejection sampling keeps memory small for huge corpora (no permutation of all positions).
    for draw in rng.integers(0, total, size=20 * n_targets + 100):
        if len(chosen) == n_targets:
            break
        doc = int(np.searchsorted(offsets, draw, side="right") - 1)
        start = int(draw - offsets[doc]) + max_distance
        if any(abs(start - s) < WINDOW for s in taken.get(doc, [])):
            continue
        taken.setdefault(doc, []).append(start)
        chosen.append((doc, start))
    if len(chosen) < n_targets:
        raise EvaluationError(
            f"only {len(chosen)} non-overlapping target windows fit in the documents, "
            f"{n_targets} asked for; give more text or fewer --targets"
        )
    return sorted(chosen)


def unrelated_contexts(targets: Sequence[tuple[int, int]], max_distance: int) -> np.ndarray:
    """perm with perm[i] a target whose context shares no token with target i's context and
    window (another document, or a part of the same one at least max_distance + WINDOW away),
    each used once: a cyclic shift of the targets, which are sorted by document and position."""
    docs = np.array([doc for doc, _ in targets])
    starts = np.array([start for _, start in targets])
    n = len(docs)
    for shift in range(n // 2, n // 2 + n):
        perm = (np.arange(n) + shift) % n
        far = (docs[perm] != docs) | (np.abs(starts[perm] - starts) >= max_distance + WINDOW)
        if shift % n and far.all():
            return perm
    raise EvaluationError(
        f"no arrangement gives each of the {n} targets an unrelated context (another document "
        f"or {max_distance + WINDOW}+ tokens away); give more or longer documents"
    )


@torch.no_grad()
def context_losses(
    model: nn.Module,
    sequences: np.ndarray,
    distances: Sequence[int],
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """Per-target mean loss (G, N) of each window read after d tokens of its own context.

    sequences: (N, D_max + 64): the D_max tokens before each window, then the window.
    """
    sequences = torch.as_tensor(sequences, dtype=torch.long)
    n, length = sequences.shape
    d_max = length - WINDOW
    losses = np.zeros((len(distances), n))
    work = sum((d + WINDOW) * n for d in distances)
    bar = tqdm(total=work, unit="tok", unit_scale=True, desc="ecl", disable=not progress)
    for g, d in enumerate(distances):
        if d > d_max:
            raise ValueError(f"distance {d} exceeds the {d_max} context tokens available")
        for start in range(0, n, batch_size):
            batch = sequences[start : start + batch_size, d_max - d :]
            # context: the d tokens before the window and the window's first token
            per_token = score(model, batch[:, : d + 1], batch[:, d + 1 :])
            losses[g, start : start + batch.shape[0]] = per_token.mean(dim=1).cpu().numpy()
            bar.update(batch.numel())
    bar.close()
    return losses


def default_unit(model: nn.Module, max_distance: int) -> int:
    """The grid unit: the model's segment length w, or 64 when w is beyond D_max (full
    attention models have no useful w)."""
    w = int(model.config.segment_len)
    return w if w <= max_distance else WINDOW


def evaluate_ecl(
    model: nn.Module,
    documents: Sequence[np.ndarray],
    n_targets: int = 200,
    max_distance: int = 2048,
    unit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 2000,
    min_gain: float = 0.0,
    progress: bool = True,
    control: bool = False,
) -> ECLResult:
    """Measure ECL of `model` on token documents (see the module docstring); `control` adds
    the unrelated-context control under result.extra["control"]."""
    unit = unit or default_unit(model, max_distance)
    distances = distance_grid(unit, max_distance)
    targets = select_targets(documents, n_targets, max_distance, seed)
    perm = unrelated_contexts(targets, max_distance) if control else None  # fail before the work
    sequences = np.stack(
        [documents[doc][start - max_distance : start + WINDOW] for doc, start in targets]
    )
    losses = context_losses(model, sequences, distances, batch_size, progress)
    result = effective_context_length(
        distances, losses, n_boot=n_boot, seed=seed, min_gain=min_gain
    )
    result.extra["min_gain"] = min_gain
    result.extra["targets"] = [[doc, start] for doc, start in targets]
    result.extra["unit"] = unit
    if perm is not None:
        swapped = np.concatenate(
            [sequences[perm, :max_distance], sequences[:, max_distance:]], axis=1
        )
        unrelated = context_losses(model, swapped, distances, batch_size, progress)
        content = unrelated - losses  # (G, N): what the own context adds over another one
        result.extra["control"] = {
            "mean_loss": unrelated.mean(axis=1).tolist(),
            "loss_interval": paired_bootstrap(unrelated, n_boot, seed=seed + 3).tolist(),
            "content_gain": content.mean(axis=1).tolist(),
            "content_interval": paired_bootstrap(content, n_boot, seed=seed + 4).tolist(),
        }
    return result


def ecl_records(
    result: ECLResult, config: dict[str, Any], device: str | torch.device
) -> list[dict[str, Any]]:
    """One "ecl" record (value, interval, the curve) and one "loss_at_context" per d."""
    curve = [
        {
            "distance": d,
            "loss": loss,
            "loss_interval": list(interval),
            "gain_from_previous": None if i == 0 else result.step_gain[i - 1],
            "gain_interval": None if i == 0 else list(result.step_interval[i - 1]),
        }
        for i, (d, loss, interval) in enumerate(
            zip(result.distances, result.mean_loss, result.loss_interval, strict=True)
        )
    ]
    extra = {
        "unit": "tokens",
        "grid_unit": result.extra.get("unit"),
        "min_gain": result.extra.get("min_gain", 0.0),
        "n_targets": result.n_targets,
        "window": WINDOW,
        "scored_tokens_per_target": WINDOW - 1,
        "curve": curve,
        "interval_method": "ECL re-computed on bootstrap resamples of targets (percentile)",
    }
    records = [make_record("ecl", result.ecl, result.ecl_interval, config, extra, device)]
    control = result.extra.get("control")
    control_series = [] if not control else [
        ("loss_at_unrelated_context", control["mean_loss"], control["loss_interval"],
         {"unit": "nats/token", "context": "another target's, another document"}),
        ("context_content_gain", control["content_gain"], control["content_interval"],
         {"unit": "nats/token",
          "definition": "loss_d(unrelated context) - loss_d(own context)"}),
    ]  # fmt: skip
    for i, point in enumerate(curve):
        point_config = {**config, "eval": {**config.get("eval", {}), "distance": point["distance"]}}
        records.append(
            make_record(
                "loss_at_context",
                point["loss"],
                point["loss_interval"],
                point_config,
                {"unit": "nats/token", "gain_from_previous": point["gain_from_previous"]},
                device,
            )
        )
        for metric, values, intervals, extra in control_series:
            records.append(
                make_record(metric, values[i], intervals[i], point_config, extra, device)
            )
    return records


def plot_ecl(result: ECLResult, path: str | Path, title: str = "") -> Path:
    """Loss against context length (symmetric-log x so that d = 0 shows), ECL marked."""
    fig, ax = new_figure(figsize=(6, 4))
    d = np.array(result.distances, dtype=float)
    loss = np.array(result.mean_loss)
    low, high = np.array(result.loss_interval).T
    ax.errorbar(d, loss, yerr=[loss - low, high - loss], marker="o", capsize=3,
                label="own context")  # fmt: skip
    control = result.extra.get("control")
    if control:
        other = np.array(control["mean_loss"])
        ax.plot(d, other, "s--", color="tab:gray", label="unrelated context (control)")
    unit = result.extra.get("unit") or (result.distances[1] if len(d) > 1 else 1)
    ax.set_xscale("symlog", linthresh=unit)
    ax.set_xlabel("context tokens before the target window (d)")
    ax.set_ylabel("loss on the target window (nats/token)")
    if result.ecl > 0:
        ax.axvline(result.ecl, color="tab:red", linestyle="--", label=f"ECL = {result.ecl}")
    if result.ecl > 0 or control:
        ax.legend()
    ax.set_title(title or f"ECL = {result.ecl} tokens ({result.n_targets} targets)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


ECL_FLAGS = {"ecl_targets": "--targets", "ecl_max_distance": "--max-distance",
             "ecl_unit": "--unit", "ecl_batch_size": "--batch-size", "ecl_bootstrap": "--bootstrap",
             "ecl_min_gain": "--min-gain", "ecl_control": "--control", "seed": "--seed",
             "dtype": "--dtype"}  # fmt: skip


def ecl_command(args) -> int:
    """`foldformer eval ecl CKPT --data FILES`: the suite's ECL (as `compare` runs it)."""
    from foldformer.evaluate.common import load_checkpoint, resolve_device
    from foldformer.evaluate.suite import HeldOutDocuments, run_ecl, settings_from_flags

    settings = settings_from_flags(args, ECL_FLAGS, run=["ecl"])
    device = resolve_device(args.device)
    model, tokenizer = load_checkpoint(args.checkpoint, device, settings.dtype)
    documents = HeldOutDocuments(args.data, tokenizer, args.cache_dir)
    result, records = run_ecl(model, args.checkpoint, documents, settings, device)
    out = Path(args.out)
    path = write_records(records, out / "ecl.json")
    plot = plot_ecl(result, out / "ecl.png", f"{Path(args.checkpoint).name}: ECL = {result.ecl}")
    rows = [
        [
            d,
            loss,
            "–" if i == 0 else f"{result.step_gain[i - 1]:+.4f}",
            "–" if i == 0 else "[{:+.4f}, {:+.4f}]".format(*result.step_interval[i - 1]),
        ]
        for i, (d, loss) in enumerate(zip(result.distances, result.mean_loss, strict=True))
    ]
    headers = ["d", "loss", "gain", "95% interval"]
    control = result.extra.get("control")
    if control:
        for row, other, gain, (low, high) in zip(
            rows,
            control["mean_loss"],
            control["content_gain"],
            control["content_interval"],
            strict=True,
        ):
            row += [other, f"{gain:+.4f} [{low:+.4f}, {high:+.4f}]"]
        headers += ["loss, unrelated context", "content gain [95%]"]  # fmt: skip
    print_table(rows, headers)
    low, high = result.ecl_interval
    print(f"ECL = {result.ecl} tokens (95% interval {low}–{high}); wrote {path} and {plot}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="model directory (config.json, weights, tokenizer)")
    parser.add_argument("--data", nargs="+", required=True, help="held-out text files/folders")
    parser.add_argument("--targets", type=int, default=200, help="target windows N")
    parser.add_argument("--cache-dir", default=None, help="token cache (default: the trainer's)")
    parser.add_argument("--max-distance", default="2K", help="D_max, e.g. 2048 or 4K")
    parser.add_argument("--unit", type=int, default=None, help="grid unit (default: w)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="a step counts if its interval's lower end exceeds this (nats/token; DESIGN: 0)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also score each window after as many tokens of another document: the content "
        "gain separates what the context says from a recurrent state warming up",
    )


__all__ = [
    "ECLResult",
    "context_losses",
    "distance_grid",
    "ecl_records",
    "effective_context_length",
    "evaluate_ecl",
    "paired_bootstrap",
    "plot_ecl",
    "select_targets",
    "unrelated_contexts",
]
