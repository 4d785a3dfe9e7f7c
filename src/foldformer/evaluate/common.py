"""Pieces every evaluation shares: loading a checkpoint, reading held-out documents as tokens,
human sizes ("64K"), plotting and a short printed table."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foldformer.config import ConfigError
from foldformer.evaluate.records import model_config
from foldformer.overrides import parse_value


class EvaluationError(ConfigError):
    """An evaluation cannot run on this input (a setting and the data or model do not fit);
    the message names the value. A ConfigError, so the command line reports it in one line."""


class SettingError(ConfigError):
    """One setting of a config section is invalid: its `name`, `value` and the `problem`, so a
    command can report it by its own flag."""

    def __init__(self, section: str, name: str, value: Any, problem: str):
        self.section, self.name, self.value, self.problem = section, name, value, problem
        super().__init__(f"[{section}] {name}={value!r}: {problem}")


def check_field_types(config, section: str) -> None:
    """SettingError for the first field whose value is not of its annotated type (bool, int,
    float, str or a list of one of them): `tolerance = "abc"` or `ecl_control = "maybe"`
    must not reach a comparison or pass as true. A string (`--set eval.seed=3`) is first
    parsed by the type, as `train` parses its options (foldformer.overrides)."""
    for f in dataclasses.fields(config):
        kind = typing.get_type_hints(type(config))[f.name]
        value = getattr(config, f.name)
        if isinstance(value, str) and kind is not str:
            with contextlib.suppress(ConfigError):  # not of the type: reported below
                value = parse_value(kind, value, f"{section}.{f.name}")
                setattr(config, f.name, value)
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            ok = isinstance(value, list) and all(_is_a(v, item) for v in value)
            expected = f"a list of {item.__name__}"
        else:
            ok, expected = _is_a(value, kind), kind.__name__
        if not ok:
            raise SettingError(section, f.name, value, f"expected {expected}")


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):  # an int is a float; a bool is neither
        allowed = (int, float) if kind is float else int
        return isinstance(value, allowed) and not isinstance(value, bool)
    return isinstance(value, kind)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int) -> int:
    """'4096', '4K' (= 4096), '1.5K', '1M' (= 1048576) -> tokens. K and M are powers of 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"cannot read {text!r} as a size: use e.g. 512, 4K, 64K or 1M")
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
    try:
        values = [item(p.strip() if isinstance(p, str) else p) for p in parts if str(p).strip()]
    except ConfigError:
        raise
    except ValueError as error:  # float("abc")
        raise ConfigError(f"cannot read {text!r} as a list: {error}") from None
    if not values:
        raise ConfigError(f"empty list: {text!r}")
    return values


def resolve_device(
    name: str | None, flag: str = "--device ", local_rank: int = 0, world_size: int = 1
) -> torch.device:
    """'auto' or None -> cuda if available else cpu; a device this machine lacks is a
    ConfigError naming it as `{flag}{name!r}` (not a CUDA assertion deep in loading the
    weights). A bare "cuda" gets an explicit index (several torch.cuda calls require one):
    the local rank under torchrun, else the current device."""
    said = f"{flag}{name!r}"
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{said} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ConfigError(f"{said}: this machine has no CUDA device; use cpu or auto")
        if device.index is None:
            index = local_rank if world_size > 1 else torch.cuda.current_device()
            device = torch.device("cuda", index)
        if device.index >= count:
            raise ConfigError(f"{said}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{said}: MPS is not available here; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{said}: use auto, cpu, cuda, cuda:N or mps")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """A model directory written by save_pretrained/training -> (model in eval mode, tokenizer)."""
    from foldformer.data.tokenizers import load_tokenizer
    from foldformer.models import load_model

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model = load_model(path, device=device).to(DTYPES[dtype]).eval()
    return model, load_tokenizer(path)


def eval_config(model: nn.Module, checkpoint: str | Path | None, **params: Any) -> dict[str, Any]:
    """The `config` of a record: model config, checkpoint path and evaluation parameters."""
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "model": model_config(model),
        "eval": params,
    }


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
    # the interval always holds p; min/max keep a rounding error from putting p outside it
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
