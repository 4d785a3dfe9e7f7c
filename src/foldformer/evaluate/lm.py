"""Language modelling on held-out text: bits per byte, and loss by position inside the fold and
by fold index — does prediction get better deeper into a document?

Each document is streamed on its own from a fresh state, starting on a fold boundary as in
training (`data.streams`: a document starts a fold with its memory reset), so its first token is
read but not predicted. Bits per byte = total nats / (ln 2 · UTF-8 bytes of the predicted tokens),
which does not depend on the tokenizer. Stream position t (0 = the document's first token)
predicts token t+1; its fold index is t // w and its position inside the fold t % w.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from foldformer.evaluate.common import EvaluationError, new_figure, print_table, save_figure
from foldformer.evaluate.records import make_record, write_records
from foldformer.generate import stream_losses

MAX_POSITION_BINS = 4096  # a full-attention model's "fold" is the whole document


def fold_bin(k: int) -> int:
    """Fold indices in doubling bins: 0 | 1 | 2–3 | 4–7 | … -> bin 0, 1, 2, 3, …"""
    return 0 if k == 0 else int(math.floor(math.log2(k))) + 1


def fold_bin_range(b: int) -> tuple[int, int]:
    """First and last fold index of bin b."""
    return (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)


@dataclass
class LMResult:
    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    per_document: list[dict[str, Any]] = field(default_factory=list)
    position_sum: np.ndarray | None = None
    position_count: np.ndarray | None = None
    fold_sum: dict[int, float] = field(default_factory=dict)
    fold_count: dict[int, int] = field(default_factory=dict)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokenizer,
    documents: Sequence[tuple[str, str]],
    max_tokens: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> LMResult:
    """Stream each (name, text) document and accumulate losses, bytes and the breakdowns.

    max_tokens: score at most that many tokens per document (its bytes counted accordingly).
    """
    device = next(model.parameters()).device
    w = int(model.config.segment_len)
    n_positions = min(w, MAX_POSITION_BINS)
    result = LMResult(position_sum=np.zeros(n_positions), position_count=np.zeros(n_positions))
    for name, text in tqdm(documents, desc="lm", unit="doc", disable=not progress):
        ids = list(tokenizer.encode(text))
        if len(ids) < 2:
            continue
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[:max_tokens]
            text = tokenizer.decode(ids)
        # The first token is only read: count the bytes of the tokens that are predicted.
        n_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
        stream = torch.tensor(ids, device=device)
        losses, _ = stream_losses(model, stream, chunk_size=chunk_size)
        losses = losses[0].double().cpu().numpy()  # entry t: the loss of predicting ids[t + 1]
        t = np.arange(len(losses))
        position = t % w
        inside = position < n_positions
        result.position_sum += np.bincount(position[inside], losses[inside], n_positions)
        result.position_count += np.bincount(position[inside], minlength=n_positions)
        folds = t // w
        bins = np.zeros_like(folds)
        bins[folds > 0] = np.floor(np.log2(folds[folds > 0])).astype(np.int64) + 1
        for b, (s, c) in enumerate(zip(np.bincount(bins, losses), np.bincount(bins), strict=True)):
            if c:
                result.fold_sum[b] = result.fold_sum.get(b, 0.0) + float(s)
                result.fold_count[b] = result.fold_count.get(b, 0) + int(c)
        nats = float(losses.sum())
        result.nats += nats
        result.tokens += len(losses)
        result.bytes += n_bytes
        result.per_document.append(
            {"name": name, "tokens": len(losses), "bytes": n_bytes, "nats": nats}
        )
    if result.tokens == 0:
        raise EvaluationError("no tokens to score: every document has fewer than 2 tokens")
    return result


def bootstrap_bpb(
    per_document: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% interval of bits per byte, resampling documents (None with fewer than 2)."""
    if len(per_document) < 2:
        return None
    nats = np.array([d["nats"] for d in per_document])
    n_bytes = np.array([d["bytes"] for d in per_document], dtype=float)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(nats), np.full(len(nats), 1 / len(nats)), size=n_boot)
    bpb = (counts @ nats) / (math.log(2) * (counts @ n_bytes))
    low, high = np.quantile(bpb, [0.025, 0.975])
    return float(low), float(high)


def breakdowns(result: LMResult) -> tuple[list[dict], list[dict]]:
    by_position = [
        {"position": p, "loss": s / c, "count": int(c)}
        for p, (s, c) in enumerate(zip(result.position_sum, result.position_count, strict=True))
        if c
    ]
    by_fold = []
    for b in sorted(result.fold_count):
        first, last = fold_bin_range(b)
        by_fold.append(
            {
                "folds": [first, last],
                "loss": result.fold_sum[b] / result.fold_count[b],
                "count": result.fold_count[b],
            }
        )
    return by_position, by_fold


def lm_records(result: LMResult, config: dict[str, Any], device) -> list[dict[str, Any]]:
    by_position, by_fold = breakdowns(result)
    common = {"tokens": result.tokens, "bytes": result.bytes, "documents": len(result.per_document)}
    return [
        make_record(
            "bits_per_byte",
            result.bits_per_byte,
            bootstrap_bpb(result.per_document),
            config,
            {
                **common,
                "definition": "total nats / (ln 2 * UTF-8 bytes of the predicted tokens)",
                "interval_method": "bootstrap over documents, 95%",
                "loss_by_position_in_fold": by_position,
                "loss_by_fold_index": by_fold,
                "per_document": result.per_document,
            },
            device,
        ),
        make_record(
            "loss_per_token", result.loss, None, config, {**common, "unit": "nats"}, device
        ),
    ]


def plot_lm(result: LMResult, path: str | Path, title: str = "") -> Path:
    by_position, by_fold = breakdowns(result)
    fig, (left, right) = new_figure(1, 2, figsize=(10, 4))
    left.plot([p["position"] for p in by_position], [p["loss"] for p in by_position], marker=".")
    left.set_xlabel("position inside the fold (t mod w)")
    left.set_ylabel("loss (nats/token)")
    left.set_title("loss by position inside the fold")
    left.grid(alpha=0.3)
    starts = [f["folds"][0] for f in by_fold]
    right.plot(starts, [f["loss"] for f in by_fold], marker="o")
    right.set_xscale("symlog", linthresh=1)
    right.set_xlabel("fold index (doubling bins, first fold of each bin)")
    right.set_ylabel("loss (nats/token)")
    right.set_title("loss by fold index")
    right.grid(alpha=0.3)
    fig.suptitle(title or f"{result.bits_per_byte:.4f} bits per byte")
    return save_figure(fig, path)


LM_FLAGS = {"lm_max_documents": "--max-documents", "lm_max_tokens": "--max-tokens",
            "dtype": "--dtype"}  # fmt: skip


def lm_command(args) -> int:
    """`foldformer eval lm CKPT --data FILES`: the suite's bits per byte (as `compare` runs
    it; here every document and token by default)."""
    from foldformer.evaluate.common import load_checkpoint, resolve_device
    from foldformer.evaluate.suite import HeldOutDocuments, run_lm, settings_from_flags

    settings = settings_from_flags(args, LM_FLAGS, run=["lm"], lm_max_documents=0, lm_max_tokens=0)
    device = resolve_device(args.device)
    model, tokenizer = load_checkpoint(args.checkpoint, device, settings.dtype)
    documents = HeldOutDocuments(args.data, tokenizer)
    result, records = run_lm(model, tokenizer, args.checkpoint, documents, settings, device)
    out = Path(args.out)
    path = write_records(records, out / "lm.json")
    plot = plot_lm(
        result, out / "lm.png", f"{Path(args.checkpoint).name}: {result.bits_per_byte:.4f} bpb"
    )
    _, by_fold = breakdowns(result)
    print_table(
        [[f"{f['folds'][0]}–{f['folds'][1]}", f["loss"], f["count"]] for f in by_fold],
        ["folds", "loss", "tokens"],
    )
    print(
        f"bits per byte {result.bits_per_byte:.4f} ({result.loss:.4f} nats/token) over "
        f"{len(result.per_document)} documents, {result.tokens:,} tokens; wrote {path} and {plot}"
    )
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="model directory (config.json, weights, tokenizer)")
    parser.add_argument("--data", nargs="+", required=True, help="held-out text files/folders")
    parser.add_argument("--max-documents", type=int, default=None, help="the first N (0: all)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per document (0: all)")


__all__ = ["LMResult", "bootstrap_bpb", "evaluate_lm", "lm_records", "plot_lm"]
