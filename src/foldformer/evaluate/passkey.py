"""Passkey retrieval accuracy over context lengths and depths (DESIGN.md §6).

Each prompt (`foldformer.data.passkey`) is streamed through the model with
`foldformer.generate.ingest` — constant memory for a folded model, so 1M tokens fit on one GPU —
then decoded greedily. A sample is correct when the generated text, after leading whitespace,
is exactly the key's digits (a longer run of digits is wrong).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from foldformer.data.passkey import answer_straddles, build_passkey_prompt
from foldformer.evaluate.common import (
    EvaluationError,
    format_size,
    new_figure,
    print_table,
    save_figure,
    wilson_interval,
)
from foldformer.evaluate.records import make_record, write_records
from foldformer.generate import greedy_generate, ingest

_DIGITS = re.compile(r"^\s*(\d+)")


def is_correct(generated_text: str, key: str) -> bool:
    """Exact match: the first run of digits, right after optional whitespace, is the key."""
    match = _DIGITS.match(generated_text)
    return match is not None and match.group(1) == key


@dataclass
class PasskeyCell:
    length: int
    depth: float
    correct: int
    samples: int
    outputs: list[tuple[str, str]]  # (key, generated text) per sample
    # how many prompts' answers cross a segment (fold) boundary: the rest of the answer is
    # written with the question in memory only (docs/retrieval.md, "answers across a fold");
    # None for a model not read in segments
    straddling: int | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples


@torch.no_grad()
def evaluate_passkey(
    model: nn.Module,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    chunk_size: int | None = None,
    progress: bool = True,
    cuda_graph: bool = False,
) -> list[PasskeyCell]:
    """Accuracy for every (length, depth) cell over `samples` random keys (seeded per cell).
    cuda_graph: ingest with `foldformer.generate.ChunkGraph` on a GPU (same answers, faster)."""
    if samples < 1 or batch_size < 1:
        raise EvaluationError(f"samples and batch_size must be >= 1, got {samples}, {batch_size}")
    bad_depths = [d for d in depths if not 0 <= d <= 1]
    if bad_depths:
        raise EvaluationError(f"passkey depths lie in [0, 1], got {bad_depths}")
    for length in lengths:  # a length too short for the prompt fails before any work
        try:
            build_passkey_prompt(tokenizer, length, 0.0, key="0" * 5)
        except ValueError as error:
            raise EvaluationError(f"passkey length {length}: {error}") from None
    # a model read in segments: where its answers cross a segment boundary (None: unknown)
    segment_len = getattr(getattr(model, "config", None), "segment_len", None)
    if not isinstance(segment_len, int):
        segment_len = None
    cells = []
    total = len(lengths) * len(depths) * samples
    bar = tqdm(total=total, desc="passkey", unit="prompt", disable=not progress)
    for length in lengths:
        # Every prompt of one length, all depths together: a stream has no padding, so rows of
        # a batch must have the same length, and one long stream of many rows costs about what
        # one row costs (the folds are sequential, the rows are not).
        # Each prompt as (int32 ids, key, answer length): 100 prompts of 16M tokens are 6.4 GB
        # as int32 arrays and about twice that as lists of Python ints.
        prompts: dict[tuple[float, int], tuple[np.ndarray, str, int]] = {}
        for depth in depths:
            for i in range(samples):
                prompt = build_passkey_prompt(
                    tokenizer,
                    length,
                    depth,
                    seed=random.Random(f"{seed}/{length}/{depth}/{i}").getrandbits(64),
                )
                ids = np.asarray(prompt.ids, dtype=np.int32)
                prompts[(depth, i)] = (ids, prompt.key, len(prompt.answer_ids))
        by_length: dict[int, list[tuple[float, int]]] = {}
        for cell_key, (ids, _, _) in prompts.items():
            by_length.setdefault(len(ids), []).append(cell_key)
        outputs: dict[tuple[float, int], tuple[str, str]] = {}
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                rows = group[start : start + batch_size]
                # on the CPU: ingest moves one chunk at a time to the device
                ids = torch.from_numpy(np.stack([prompts[k][0] for k in rows]))
                new_tokens = max(prompts[k][2] for k in rows) + 2
                state = ingest(
                    model,
                    ids[:, :-1],
                    chunk_size=chunk_size,
                    progress=progress and length > 2**16,
                    cuda_graph=cuda_graph,
                )
                generated = greedy_generate(model, ids[:, -1:], new_tokens, memory=state)
                for row, k in enumerate(rows):
                    outputs[k] = (prompts[k][1], tokenizer.decode(generated[row].tolist()))
                bar.update(len(rows))
        for depth in depths:
            cell_outputs = [outputs[(depth, i)] for i in range(samples)]
            correct = sum(is_correct(text, key) for key, text in cell_outputs)
            straddling = None
            if segment_len is not None:
                straddling = sum(
                    answer_straddles(len(ids), answer_len, segment_len)
                    for ids, _, answer_len in (prompts[(depth, i)] for i in range(samples))
                )
            cells.append(PasskeyCell(length, depth, correct, samples, cell_outputs, straddling))
    bar.close()
    return cells


def passkey_records(
    cells: Sequence[PasskeyCell], config: dict[str, Any], device
) -> list[dict[str, Any]]:
    """One "passkey_accuracy" record per cell and one overall."""
    records = []
    for cell in cells:
        cell_config = {
            **config,
            "eval": {**config.get("eval", {}), "length": cell.length, "depth": cell.depth},
        }
        records.append(
            make_record(
                "passkey_accuracy",
                cell.accuracy,
                wilson_interval(cell.correct, cell.samples),
                cell_config,
                {
                    "correct": cell.correct,
                    "samples": cell.samples,
                    "interval_method": "Wilson score, 95%",
                    "answers_straddling_a_segment": cell.straddling,
                    "examples": [{"key": k, "generated": g} for k, g in cell.outputs[:5]],
                },
                device,
            )
        )
    correct = sum(c.correct for c in cells)
    total = sum(c.samples for c in cells)
    records.append(
        make_record(
            "passkey_accuracy_overall",
            correct / total,
            wilson_interval(correct, total),
            config,
            {
                "correct": correct,
                "samples": total,
                "grid": [
                    {"length": c.length, "depth": c.depth, "accuracy": c.accuracy} for c in cells
                ],
            },
            device,
        )
    )
    return records


def accuracy_grid(cells: Sequence[PasskeyCell]) -> tuple[list[int], list[float], np.ndarray]:
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c.depth), lengths.index(c.length)] = c.accuracy
    return lengths, depths, grid


def plot_passkey(cells: Sequence[PasskeyCell], path: str | Path, title: str = "") -> Path:
    """Heat map: depth (rows) against context length (columns), accuracy in each cell."""
    lengths, depths, grid = accuracy_grid(cells)
    fig, ax = new_figure(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_size(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or "passkey retrieval")
    return save_figure(fig, path)


PASSKEY_FLAGS = {"passkey_lengths": "--lengths", "passkey_depths": "--depths",
                 "passkey_samples": "--samples", "passkey_batch_size": "--batch-size",
                 "seed": "--seed", "dtype": "--dtype"}  # fmt: skip


def passkey_command(args) -> int:
    """`foldformer eval passkey CKPT --lengths 1K,4K --depths 0,0.5,1 --samples 20`: the
    suite's passkey evaluation (as `compare` runs it)."""
    from foldformer.evaluate.common import load_checkpoint, resolve_device
    from foldformer.evaluate.suite import run_passkey, settings_from_flags

    settings = settings_from_flags(args, PASSKEY_FLAGS, run=["passkey"])
    device = resolve_device(args.device)
    model, tokenizer = load_checkpoint(args.checkpoint, device, settings.dtype)
    if args.compile:
        model.compile_fold()  # a no-op for a model without a segment step
    cells, records = run_passkey(
        model, tokenizer, args.checkpoint, settings, device, cuda_graph=args.cuda_graph
    )
    out = Path(args.out)
    path = write_records(records, out / "passkey.json")
    plot = plot_passkey(cells, out / "passkey.png", f"passkey: {Path(args.checkpoint).name}")
    lengths_sorted, depths_sorted, grid = accuracy_grid(cells)
    rows = [
        [f"{d:g}"] + [f"{grid[i, j]:.0%}" for j in range(len(lengths_sorted))]
        for i, d in enumerate(depths_sorted)
    ]
    print_table(rows, ["depth \\ length"] + [format_size(n) for n in lengths_sorted])
    straddled = sorted({c.length for c in cells if c.straddling})
    if straddled:
        print("answers straddling a segment boundary (written with the question in memory "
              f"only) at: {', '.join(format_size(n) for n in straddled)}")  # fmt: skip
    print(f"wrote {path} and {plot}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="model directory (config.json, weights, tokenizer)")
    parser.add_argument("--lengths", default="1K,4K", help="prompt lengths, e.g. 1K,64K,1M")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=20, help="random keys per cell")
    parser.add_argument(
        "--batch-size", type=int, default=128, help="prompts streamed together (all depths)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the fold step (GPU: faster)"
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU, replay a captured CUDA graph per chunk of folds (same answers, faster)",
    )
    parser.add_argument("--seed", type=int, default=0)


__all__ = ["PasskeyCell", "evaluate_passkey", "is_correct", "passkey_records", "plot_passkey"]
