"""Configuration dataclasses: validated on construction, JSON round-trip.

Every field name here is also the name used by `--key value` overrides on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

FOLD_IN_VARIANTS = ("norm", "norm_linear", "none")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("gelu", "swiglu", "relu")
GATE_ACTIVATIONS = ("sigmoid", "hardsigmoid", "clamp_st")
# Fields that choose how a model computes, not what: a run may resume, and a saved context
# state may load, under another value (the numbers change by float rounding at most).
KERNEL_FIELDS = ("attention",)
# What transformers' save_pretrained adds to a config.json (foldformer.hf): not model fields,
# skipped when foldformer reads one.
HF_CONFIG_KEYS = ("architectures", "transformers_version", "dtype", "torch_dtype", "use_cache")

T = TypeVar("T", bound="JsonConfig")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class JsonConfig:
    """Mixin: dict/JSON round-trip for flat dataclasses, with unknown keys rejected by name."""

    # Fields added after configs were first written: left out of `to_dict` at their default, so
    # files and run configs written before they existed compare equal to new ones.
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name in self.LATER_FIELDS:
            if values[name] == defaults[name]:
                del values[name]
        return values

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**values)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls: type[T], text_or_path: str | Path) -> T:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def read_model_config(directory: str | Path) -> tuple[str, dict[str, Any]]:
    """(model_type, config fields) of a model folder's config.json, written by foldformer or by
    transformers (foldformer.hf); FileNotFoundError naming the folder when it has none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: no config.json in it")
    values = json.loads(path.read_text())
    for key in HF_CONFIG_KEYS:
        values.pop(key, None)
    return values.pop("model_type", "folded"), values


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DecoderConfig(JsonConfig):
    """The shape every model of the project shares (the in-house ones and the PyPI peers).

    A stream is read in segments of ``segment_len`` tokens (w) with a memory of ``memory_len``
    (m) states whose meaning each model gives (the folded model: final-layer states folded back
    to the input of the stack).
    """

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model (8/3 * d_model rounded for swiglu)
    segment_len: int = 8
    memory_len: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "segment_len"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        _check(
            isinstance(self.memory_len, int) and self.memory_len >= 0,
            f"memory_len must be an integer >= 0, got {self.memory_len!r}",
        )
        _check(
            self.d_model % self.n_heads == 0,
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        _check(
            (self.d_model // self.n_heads) % 2 == 0,
            f"head size d_model/n_heads = {self.d_model // self.n_heads} must be even for "
            "rotary embeddings",
        )
        if self.d_ff is None:
            self.d_ff = self.default_d_ff()
        _check(
            isinstance(self.d_ff, int) and self.d_ff >= 1,
            f"d_ff must be a positive integer, got {self.d_ff!r}",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")

    def default_d_ff(self) -> int:
        return 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TransformerConfig(DecoderConfig):
    """The in-house block stack (foldformer.layers): norms, MLP, rotary positions, GPT-2
    initialisation, and the attention kernel (a name in ``foldformer.layers.ATTENTION``:
    "sdpa", "eager", "flex", ...; every kernel computes the same attention)."""

    norm: str = "rmsnorm"
    activation: str = "gelu"
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    attention: str = "sdpa"  # the kernel: no part of the model's weights or numbers

    LATER_FIELDS = ("attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        from foldformer.layers import ATTENTION  # the table lives with the kernels

        _check(self.norm in NORMS, f"norm={self.norm!r} is not one of {NORMS}")
        _check(
            self.activation in ACTIVATIONS,
            f"activation={self.activation!r} is not one of {ACTIVATIONS}",
        )
        _check(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base!r}")
        _check(self.init_std > 0, f"init_std must be > 0, got {self.init_std!r}")
        _check(
            self.attention in ATTENTION,
            f"attention={self.attention!r} is not one of {tuple(ATTENTION)}",
        )
        _check(
            not (self.attention == "flex" and self.dropout),
            f"attention='flex' has no dropout, got dropout={self.dropout!r}",
        )

    def default_d_ff(self) -> int:
        if self.activation == "swiglu":
            return _round_up(int(8 * self.d_model / 3), 8)
        return 4 * self.d_model


@dataclass
class FoldedConfig(TransformerConfig):
    """Shape of a folded-context decoder (DESIGN.md §3).

    A sequence is read in segments of ``segment_len`` tokens (w). Before each segment, the
    last ``memory_len`` (m) final-layer token states of the previous fold are fed back at the
    input of the stack ("folded" in time), so the fold sees m + w positions. ``memory_len=0``
    gives independent segments; ``segment_len >= T`` gives a plain full-attention GPT.
    """

    fold_in: str = "norm"  # how a top-of-stack state re-enters at the bottom
    learned_initial_memory: bool = True  # False: the initial memory is a fixed zero block
    # Beyond the note (off = the note's plain fold): the next memory is a learned per-channel
    # mix g * old + (1 - g) * new of the old memory and the fold's last m final states.
    memory_gate: bool = False
    # The gate's squashing function: "sigmoid" never reaches 1, so what it keeps decays as g^k
    # over k folds; "hardsigmoid" (exactly 0 or 1 past |x| >= 3) and "clamp_st" (a sigmoid
    # stretched by 10% and clamped to [0, 1], with the sigmoid's gradient passed straight
    # through the clamp) can hold a channel unchanged over any number of folds
    # (docs/retrieval.md).
    gate_activation: str = "sigmoid"
    gate_bias: float = 0.0  # initial gate bias: 0 = half old, half new
    # Retention levers (issue 13, docs/retrieval.md "Levers"), each off by default.
    # Training only: Gaussian noise of this size relative to each row's RMS is added to the
    # carried memory after every fold, so the read-out learns to read a memory that has moved.
    memory_noise: float = 0.0
    # m > w: the memory is a FIFO of the last m/w condensed blocks of w rows; each fold the
    # newest w final states enter (gated with the previous block if memory_gate) and the oldest
    # w rows leave, the rest carried unchanged. Off (the note's): the fold's last m final
    # states, so memory rows are re-evolved by every fold they stay for.
    memory_fifo: bool = False
    # Write positions apart from read positions: m learned write tokens follow the segment in
    # every fold, and their final states (not the segment's) become the next memory.
    memory_write: bool = False

    LATER_FIELDS = (
        "attention", "gate_activation", "gate_bias", "memory_noise", "memory_fifo",
        "memory_write",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.fold_in in FOLD_IN_VARIANTS,
            f"fold_in={self.fold_in!r} is not one of {FOLD_IN_VARIANTS}",
        )
        _check(
            self.gate_activation in GATE_ACTIVATIONS,
            f"gate_activation={self.gate_activation!r} is not one of {GATE_ACTIVATIONS}",
        )
        _check(
            self.memory_noise >= 0 and math.isfinite(self.memory_noise),
            f"memory_noise must be a finite number >= 0, got {self.memory_noise!r}",
        )
        _check(
            not self.memory_fifo or self.memory_len > self.segment_len,
            f"memory_fifo needs memory_len > segment_len (a FIFO of several blocks), got "
            f"memory_len={self.memory_len}, segment_len={self.segment_len}",
        )
        _check(
            not (self.memory_fifo and self.memory_write),
            "memory_fifo and memory_write are exclusive (the write tokens fill the whole memory)",
        )
        _check(
            not self.memory_write or self.memory_len > 0,
            "memory_write needs memory_len >= 1, got memory_len=0",
        )
        _check(
            not (self.memory_gate and self.memory_len > self.segment_len)
            or self.memory_fifo
            or self.memory_write,
            f"memory_gate needs memory_len <= segment_len (the gated rows are new states) unless "
            f"memory_fifo or memory_write, got memory_len={self.memory_len}, "
            f"segment_len={self.segment_len}",
        )

    @property
    def fold_len(self) -> int:
        """Positions one fold attends over: memory plus segment (m + w)."""
        return self.memory_len + self.segment_len


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
