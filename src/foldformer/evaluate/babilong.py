"""BABILong question answering accuracy against context length (DESIGN.md §6).

Samples come from the held-out stories of a bAbI file (the last 10% of stories,
`data.babilong.split_babi`, which training never uses), hidden in background sentences from
books by `data.babilong.build_babilong_sample`, seeded: the same seed gives the same prompts.
The same bAbI questions are asked at every length, so accuracies are paired across lengths.
Each prompt is streamed at constant memory (`generate.ingest`), then decoded greedily; the
answer is the first word produced, compared without regard to case.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from foldformer.evaluate.common import (
    EvaluationError,
    eval_config,
    format_size,
    new_figure,
    print_table,
    save_figure,
    wilson_interval,
)
from foldformer.evaluate.records import make_record, write_records
from foldformer.generate import greedy_generate, ingest

_WORD = re.compile(r"[A-Za-z]+")


def first_word(text: str) -> str:
    """The first alphabetic word of the generated text ('' if none)."""
    match = _WORD.search(text)
    return match.group(0) if match else ""


@dataclass
class BabilongCell:
    length: int
    correct: int
    samples: int
    mean_prompt_tokens: float
    outputs: list[dict[str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples


def build_eval_samples(
    babi_samples: Sequence,
    background: list[str],
    lengths: Sequence[int],
    n_samples: int,
    tokenizer,
    seed: int = 0,
    exact: bool = False,
    facts_within: int = 0,
    facts_at: str = "end",
) -> dict[int, list]:
    """{length: [BabilongExample, ...]}: the same `n_samples` bAbI questions at every length,
    each built with its own seeded generator (reproducible, independent of the other lengths).
    exact: every prompt of a length has exactly that many tokens (`build_babilong_sample`), so
    one length is one batch. facts_within, facts_at: the facts only among the first or last
    facts_within tokens of background (`build_babilong_sample`; 0: anywhere)."""
    from foldformer.data.babilong import TokenizedBackground, build_babilong_sample

    if n_samples > len(babi_samples):
        raise EvaluationError(
            f"--samples {n_samples}: the bAbI split has only {len(babi_samples)} questions"
        )
    chosen = np.random.default_rng(seed).choice(len(babi_samples), n_samples, replace=False)
    if isinstance(background, list) and background and any(n > 0 for n in lengths):
        # tokenized once for all samples
        background = TokenizedBackground(background, tokenizer)
    return {
        length: [
            build_babilong_sample(
                babi_samples[int(index)],
                background,
                length,
                tokenizer,
                np.random.default_rng([seed, length, i]),
                exact=exact,
                facts_within=facts_within,
                facts_at=facts_at,
            )
            for i, index in enumerate(chosen)
        ]
        for length in lengths
    }


@torch.no_grad()
def evaluate_babilong(
    model: nn.Module,
    tokenizer,
    examples: dict[int, list],
    max_new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    cuda_graph: bool = False,
) -> list[BabilongCell]:
    """Accuracy (first generated word == answer) for each length's examples. cuda_graph: ingest
    with `foldformer.generate.ChunkGraph` on a GPU."""
    device = next(model.parameters()).device
    cells = []
    total = sum(len(v) for v in examples.values())
    bar = tqdm(total=total, desc="babilong", unit="sample", disable=not progress)
    for length, items in examples.items():
        by_length: dict[int, list[int]] = {}
        for i, example in enumerate(items):
            by_length.setdefault(len(example.input_ids), []).append(i)
        outputs: list[dict[str, str]] = [{}] * len(items)
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                rows = indices[start : start + batch_size]
                # on the host: ingest moves one chunk at a time to the device
                ids = torch.from_numpy(np.stack([items[i].input_ids for i in rows]))
                state = ingest(model, ids[:, :-1], cuda_graph=cuda_graph)
                last = ids[:, -1:].to(device=device, dtype=torch.long)
                generated = greedy_generate(model, last, max_new_tokens, memory=state)
                for row, i in enumerate(rows):
                    text = tokenizer.decode(generated[row].tolist())
                    outputs[i] = {
                        "answer": items[i].answer,
                        "generated": text,
                        "word": first_word(text),
                    }
                bar.update(len(rows))
        correct = sum(o["word"].lower() == o["answer"].lower() for o in outputs)
        mean_tokens = float(np.mean([len(e.input_ids) for e in items]))
        cells.append(BabilongCell(length, correct, len(items), mean_tokens, outputs))
    bar.close()
    return cells


def babilong_records(
    cells: Sequence[BabilongCell], config: dict[str, Any], device
) -> list[dict[str, Any]]:
    records = []
    for cell in cells:
        cell_config = {**config, "eval": {**config.get("eval", {}), "length": cell.length}}
        records.append(
            make_record(
                "babilong_accuracy",
                cell.accuracy,
                wilson_interval(cell.correct, cell.samples),
                cell_config,
                {
                    "correct": cell.correct,
                    "samples": cell.samples,
                    "mean_prompt_tokens": cell.mean_prompt_tokens,
                    "interval_method": "Wilson score, 95%",
                    "examples": cell.outputs[:5],
                },
                device,
            )
        )
    return records


def plot_babilong(cells: Sequence[BabilongCell], path: str | Path, title: str = "") -> Path:
    fig, ax = new_figure(figsize=(6, 4))
    x = range(len(cells))
    accuracy = [c.accuracy for c in cells]
    low, high = zip(*(wilson_interval(c.correct, c.samples) for c in cells), strict=True)
    ax.errorbar(
        list(x),
        accuracy,
        yerr=[np.subtract(accuracy, low), np.subtract(high, accuracy)],
        marker="o",
        capsize=3,
    )
    ax.set_xticks(list(x), [format_size(c.length) for c in cells])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "BABILong")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def babilong_command(args) -> int:
    """`foldformer eval babilong CKPT --task qa1 --lengths 0,1K,4K --books DIR --babi FILE`."""
    from foldformer.data.babilong import babi_file, load_babi, load_background, split_babi
    from foldformer.evaluate.common import load_checkpoint, parse_list, parse_size, resolve_device

    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):  # fmt: skip
        if value < 1:
            raise EvaluationError(f"{flag} {value}: must be >= 1")
    try:  # parse_size refuses negative sizes
        facts_within = parse_size(args.facts_within)
    except ValueError as error:
        raise EvaluationError(f"--facts-within {args.facts_within!r}: {error}") from None
    try:
        lengths = parse_list(args.lengths)
    except ValueError as error:
        raise EvaluationError(f"--lengths {args.lengths!r}: {error}") from None
    device = resolve_device(args.device)
    model, tokenizer = load_checkpoint(args.checkpoint, device, args.dtype)
    path = babi_file(args.task, args.babi)
    _, held_out = split_babi(load_babi(path))
    background = load_background(args.books)
    examples = build_eval_samples(held_out, background, lengths, args.samples, tokenizer, args.seed,
                                  exact=args.exact, facts_within=facts_within,
                                  facts_at=args.facts_at)  # fmt: skip
    cells = evaluate_babilong(model, tokenizer, examples, args.max_new_tokens, args.batch_size,
                              cuda_graph=args.cuda_graph)  # fmt: skip
    config = eval_config(
        model,
        args.checkpoint,
        task=f"babilong-{args.task}",
        babi=str(path),
        books=str(args.books),
        lengths=lengths,
        samples=args.samples,
        seed=args.seed,
        split="held-out stories (last 10%)",
        exact=args.exact,
        facts_within=facts_within,
        facts_at=args.facts_at if facts_within else None,
        dtype=args.dtype,
    )
    out = Path(args.out)
    written = write_records(
        babilong_records(cells, config, device), out / f"babilong_{args.task}.json"
    )
    plot = plot_babilong(
        cells,
        out / f"babilong_{args.task}.png",
        f"BABILong {args.task}: {Path(args.checkpoint).name}",
    )
    print_table(
        [[format_size(c.length), round(c.mean_prompt_tokens), f"{c.accuracy:.1%}"] for c in cells],
        ["length", "mean tokens", "accuracy"],
    )
    print(f"wrote {written} and {plot}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="model directory (config.json, weights, tokenizer)")
    parser.add_argument("--task", default="qa1", help="bAbI task: qa1, qa2, qa4, qa5")
    parser.add_argument("--lengths", default="0,1K,4K", help="prompt lengths, e.g. 0,1K,64K")
    parser.add_argument("--books", required=True, help="background books (file, folder, archive)")
    parser.add_argument("--babi", required=True, help="bAbI task file or folder of them")
    parser.add_argument("--samples", type=int, default=100, help="questions per length")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU, replay a captured CUDA graph per chunk of folds (same answers, faster)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="fill every prompt to exactly its length (a cut sentence before the question, the "
        "books repeated if too short), so a length's samples form one batch",
    )
    parser.add_argument(
        "--facts-within",
        default="0",
        metavar="TOKENS",
        help="a diagnosis: hide the facts only among the first or last TOKENS of background "
        "(e.g. 8K; default anywhere), to tell drift over a long prompt from facts forgotten",
    )
    parser.add_argument(
        "--facts-at",
        choices=("start", "end"),
        default="end",
        help="with --facts-within: near the prompt's start or its question",
    )
    parser.add_argument("--seed", type=int, default=0)


__all__ = ["BabilongCell", "build_eval_samples", "evaluate_babilong", "first_word"]
