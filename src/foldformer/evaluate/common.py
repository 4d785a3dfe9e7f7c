"""Pieces every evaluation shares: loading a checkpoint, reading held-out documents as tokens,
human sizes ("64K"), plotting and a short printed table."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from foldformer.evaluate.records import model_config

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int) -> int:
    """'4096', '4K' (= 4096), '1.5K', '1M' (= 1048576) -> tokens. K and M are powers of 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 512, 4K, 64K or 1M")
    return int(round(float(match.group(1)) * _UNITS[match.group(2).lower()]))


def format_size(n: int) -> str:
    """The inverse of parse_size for round numbers: 1024 -> '1K', 1048576 -> '1M'."""
    for suffix, unit in (("M", 1024**2), ("K", 1024)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def parse_list(text: str | Sequence, item=parse_size) -> list:
    """'1K,4K' or ['1K', '4K'] -> [1024, 4096] (items parsed by `item`)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    values = [item(p.strip() if isinstance(p, str) else p) for p in parts if str(p).strip()]
    if not values:
        raise ValueError(f"empty list: {text!r}")
    return values


def resolve_device(name: str | None) -> torch.device:
    """'auto' or None -> cuda if available else cpu."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """A model directory written by save_pretrained/training -> (model in eval mode, tokenizer)."""
    from foldformer.data.tokenizers import load_tokenizer
    from foldformer.models import load_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model = load_model(path, device=device).to(DTYPES[dtype]).eval()
    return model, load_tokenizer(path)


def eval_config(model: nn.Module, checkpoint: str | Path | None, **params: Any) -> dict[str, Any]:
    """The `config` of a record: model config, checkpoint path and evaluation parameters."""
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "model": model_config(model),
        "eval": params,
    }


def token_documents(
    specs: Iterable[str],
    tokenizer,
    min_tokens: int = 0,
    max_documents: int | None = None,
) -> list[tuple[str, np.ndarray]]:
    """Held-out documents as (name, token ids) with at least `min_tokens` tokens each.

    Documents are read with the data package's loaders (files, folders, archives) and
    tokenized one by one, in order; reading stops after `max_documents` kept documents.
    """
    from foldformer.data.text import iter_documents

    kept: list[tuple[str, np.ndarray]] = []
    seen = 0
    for spec in specs:
        for document in iter_documents(spec):
            seen += 1
            ids = np.asarray(tokenizer.encode(document.text), dtype=np.int64)
            if len(ids) >= min_tokens:
                kept.append((document.name, ids))
                if max_documents is not None and len(kept) >= max_documents:
                    return kept
    if not kept:
        raise ValueError(
            f"none of the {seen} documents in {list(specs)} has at least {min_tokens} tokens"
        )
    return kept


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """A small aligned table on stdout."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def new_figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0% and 100%, unlike the normal
    approximation)."""
    if total <= 0:
        raise ValueError(f"an accuracy needs at least one sample, got total={total}")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
