"""What every in-house baseline shares: the config fields, the state container and the protocol.

The baselines are built from the blocks of `foldformer.model` (``Block``, ``make_norm``,
``rotary_tables``...) so that a comparison measures the recurrence, not a different block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foldformer.config import FoldedConfig, JsonConfig
from foldformer.model import (
    Block,
    StreamingLM,
    apply_rotary,
    language_model_loss,
    make_norm,
)

# Fields with the same name and meaning as in FoldedConfig (validated by FoldedConfig itself).
SHARED_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "segment_len",
    "memory_len",
    "norm",
    "activation",
    "dropout",
    "tie_embeddings",
    "rope_base",
    "init_std",
)

S = TypeVar("S", bound="VariantState")


@dataclass
class VariantConfig(JsonConfig):
    """The shape fields shared with FoldedConfig: same names, defaults and checks."""

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model (8/3 * d_model rounded for swiglu)
    segment_len: int = 8
    memory_len: int = 8
    norm: str = "rmsnorm"
    activation: str = "gelu"
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # One set of checks for every model: FoldedConfig validates the shared fields and
        # fills in the default d_ff.
        core = FoldedConfig(**{name: getattr(self, name) for name in SHARED_FIELDS})
        self.d_ff = core.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# ---------------------------------------------------------------------------------------------
# State: named tensors (or None), each with its batch dimension declared
# ---------------------------------------------------------------------------------------------


@dataclass
class VariantState:
    """Base of the streaming states: plain tensors, indexable by batch row like FoldState.

    Subclasses declare ``BATCH_DIMS`` (field name -> the dimension that holds the batch).
    """

    BATCH_DIMS: ClassVar[dict[str, int]] = {}

    def _map(self: S, fn) -> S:
        """fn(tensor, batch_dim) applied to every tensor field; None stays None."""
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            changes[field.name] = None if value is None else fn(value, self.BATCH_DIMS[field.name])
        return dataclasses.replace(self, **changes)

    @property
    def batch_size(self) -> int:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                return value.shape[self.BATCH_DIMS[field.name]]
        raise ValueError(f"{type(self).__name__} holds no tensor")

    def to(self: S, *args, **kwargs) -> S:
        # Masks and counters keep their dtype when the state moves to another float dtype.
        def move(t: Tensor, _dim: int) -> Tensor:
            if t.dtype == torch.bool:
                device = kwargs.get("device", next((a for a in args if _is_device(a)), None))
                return t if device is None else t.to(device)
            return t.to(*args, **kwargs)

        return self._map(move)

    def detach(self: S) -> S:
        return self._map(lambda t, _dim: t.detach())

    def index(self: S, rows: Tensor | slice | list[int]) -> S:
        """The state of the chosen batch rows."""
        return self._map(lambda t, dim: t[(slice(None),) * dim + (rows,)])

    @classmethod
    def concat(cls: type[S], states: list[S]) -> S:
        """One state of all the rows of `states` (e.g. the micro-batches of a step)."""
        first, changes = states[0], {}
        for field in dataclasses.fields(first):
            parts = [getattr(s, field.name) for s in states]
            dim = cls.BATCH_DIMS[field.name]
            changes[field.name] = None if parts[0] is None else torch.cat(parts, dim=dim)
        return dataclasses.replace(first, **changes)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors by name, e.g. for ``safetensors.torch.save_file``."""
        return {
            f.name: getattr(self, f.name).contiguous()
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_state_dict(cls: type[S], tensors: dict[str, Tensor]) -> S:
        return cls(**{f.name: tensors.get(f.name) for f in dataclasses.fields(cls)})


def _is_device(value: Any) -> bool:
    return isinstance(value, torch.device) or (
        isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda", "mps", "meta", "xpu")
    )


# ---------------------------------------------------------------------------------------------
# The protocol shared by the in-house variants
# ---------------------------------------------------------------------------------------------


def check_token_inputs(
    input_ids: Tensor, labels: Tensor | None, reset_mask: Tensor | None, vocab_size: int
) -> None:
    """The input checks of FoldedTransformer, with the same messages."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range for vocab_size={vocab_size}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if reset_mask is not None and (
        reset_mask.dtype != torch.bool or reset_mask.shape not in ((B,), (B, T))
    ):
        raise ValueError(
            f"reset_mask must be a bool tensor of shape ({B},) or ({B}, {T}), got "
            f"{reset_mask.dtype} {tuple(reset_mask.shape)}"
        )


def expand_reset_mask(reset_mask: Tensor | None, T: int) -> Tensor | None:
    """(B,) -> (B, T) with the resets before token 0; (B, T) unchanged."""
    if reset_mask is not None and reset_mask.dim() == 1:
        return F.pad(reset_mask[:, None], (0, T - 1))
    return reset_mask


def check_state_type(memory: Any, expected: type, batch_size: int) -> None:
    if memory is None:
        return
    if not isinstance(memory, expected):
        raise TypeError(
            f"memory must be the {expected.__name__} returned by the model, got "
            f"{type(memory).__name__}"
        )
    if memory.batch_size != batch_size:
        raise ValueError(
            f"memory holds {memory.batch_size} rows but input_ids has batch size {batch_size}"
        )


def memory_key_values(
    block: Block, states: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """Keys/values (B, heads, m, head_dim) that `block` computes for cached states (B, m, d).

    Mirrors the projection of ``Attention.forward`` (pre-norm, fused qkv, rotary on keys).
    """
    attn = block.attn
    B, m, _ = states.shape
    qkv = attn.qkv(block.norm_attn(states)).view(B, m, 3, attn.n_heads, attn.head_dim)
    k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    return apply_rotary(k, cos, sin), v


class VariantModel(StreamingLM):
    """A decoder stack with the project protocol; subclasses write `forward`.

    Holds embeddings, the `Block` stack, the final norm and the head, initialised as in
    FoldedTransformer, plus `step`, `num_parameters` and save/load.
    """

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type[VariantConfig]] = VariantConfig
    state_class: ClassVar[type[VariantState]] = VariantState  # what `.memory` holds

    def __init__(self, config: VariantConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = make_norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation, as in FoldedTransformer (residual projections scaled by depth)."""
        std = self.config.init_std
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=std)
        for block in self.blocks:
            for linear in (block.attn.proj, block.mlp.down):
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.n_layers))
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def logits_and_loss(
        self, hidden: Tensor, labels: Tensor | None, logits_to_keep: int
    ) -> tuple[Tensor, Tensor | None]:
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
            labels = None if labels is None else labels[:, -logits_to_keep:]
        logits = self.head(self.norm_out(hidden))
        loss = None if labels is None else language_model_loss(logits, labels)
        return logits, loss
