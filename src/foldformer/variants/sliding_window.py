"""Sliding-window attention (DESIGN.md §5): local causal attention, window w, no memory.

Token t attends, in every layer, to itself and the w − 1 tokens before it, so information can
travel at most about w·L tokens back through the stack. A stream keeps only the last (at most
2w − 1) keys/values per layer: inference memory is constant.

The attention runs block by block: the stream is cut into blocks of w tokens (aligned to the
stream, not to the chunk a call receives) and a block's queries see a window of 2w keys, the
previous block and their own, through a band mask. Rotary positions are taken inside that
window (keys 0 … 2w−1, queries w … 2w−1), so they never grow with the stream and every
chunking of a stream does exactly the same arithmetic.

The model has no recurrence, so it replaces the segment driver's loop (`read`) with that one
block-parallel pass over the chunk; the driver's checks, reset rule (resets on block
boundaries) and outputs are the same as every model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from foldformer.config import ConfigError, TransformerConfig
from foldformer.layers import Attention, TransformerLM, apply_rotary
from foldformer.streaming import StreamState, check_reset_columns, reset_columns


@dataclass
class SlidingWindowConfig(TransformerConfig):
    """segment_len is the window w (keys per query, itself included); memory_len must be 0."""

    memory_len: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_len != 0:
            raise ConfigError(
                f"sliding_window keeps no memory: memory_len must be 0, got {self.memory_len}"
            )


@dataclass
class SlidingWindowState(StreamState):
    """keys, values: (L, B, heads, P, head_dim) before rotary, P <= 2w − 1: the previous
    complete block (once there is one) and the p tokens read of the current block.
    prev_valid: (B,) whether the current block may see the previous one (False at the start
    of a stream and after a reset)."""

    prev_valid: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None

    BATCH_DIMS: ClassVar[dict[str, int]] = {"prev_valid": 0, "keys": 1, "values": 1}

    def cached(self) -> int:
        return 0 if self.keys is None else self.keys.shape[3]


class WindowCache(NamedTuple):
    """What a WindowAttention layer sees of the past (passed through Block as ``past_kv``)."""

    keys: Tensor  # (B, heads, P, head_dim) before rotary
    values: Tensor
    prev_valid: Tensor  # (B, n_blocks): may query block c see block c − 1


class WindowAttention(Attention):
    """Causal attention over the last `window` positions, computed block by block.

    Same parameters as Attention (qkv, proj); ``past_kv`` is a WindowCache. Returns the output
    and the keys/values (before rotary) of all cached and new positions.
    """

    def __init__(self, config: SlidingWindowConfig):
        super().__init__(config)
        self.window = config.segment_len

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_kv: WindowCache
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, N, d = x.shape
        w, h, hd = self.window, self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, 3, h, hd).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, head_dim)
        keys = torch.cat([past_kv.keys, k], dim=2)
        values = torch.cat([past_kv.values, v], dim=2)
        P = past_kv.keys.shape[2]
        # Lay the keys out from the start of the previous block (a zero block when there is
        # none: it is masked), padded on the right to whole blocks.
        p, lead = (P - w, 0) if P >= w else (P, w)
        n_blocks = -(-(p + N) // w)  # query blocks
        right = (n_blocks + 1) * w - lead - P - N
        windows = []
        for t in (keys, values):
            t = F.pad(t, (0, 0, lead, right))  # (B, h, (n_blocks + 1) * w, hd)
            windows.append(t.unfold(2, 2 * w, w).transpose(-1, -2))  # (B, h, n_blocks, 2w, hd)
        kw, vw = windows
        qw = F.pad(q, (0, 0, p, n_blocks * w - p - N)).view(B, h, n_blocks, w, hd)
        qw = apply_rotary(qw, cos[w : 2 * w], sin[w : 2 * w])
        kw = apply_rotary(kw, cos[: 2 * w], sin[: 2 * w])
        # Query i of a block sits at window position w + i and sees positions i+1 … w+i.
        i = torch.arange(w, device=x.device)[:, None]
        j = torch.arange(2 * w, device=x.device)[None, :]
        band = (j > i) & (j <= i + w)  # (w, 2w)
        from_prev = (j < w).expand(w, 2 * w)
        visible = past_kv.prev_valid[:, None, :, None, None]  # (B, 1, n_blocks, 1, 1)
        mask = band & (~from_prev | visible)  # (B, 1, n_blocks, w, 2w)
        y = self.kernel(qw, kw, vw, mask, self.dropout if self.training else 0.0)
        y = y.reshape(B, h, n_blocks * w, hd)[:, :, p : p + N]
        return self.proj(y.transpose(1, 2).reshape(B, N, d)), keys, values


class SlidingWindowTransformer(TransformerLM):
    """A decoder whose every layer sees only the last w positions (window = segment_len).

    bptt has no effect: the model has no recurrence; gradients reach as far back as the
    windows of the chunk reach. checkpoint recomputes each layer in backward.
    """

    model_type: ClassVar[str] = "sliding_window"
    config_class: ClassVar[type] = SlidingWindowConfig
    state_class: ClassVar[type] = SlidingWindowState

    def __init__(self, config: SlidingWindowConfig):
        super().__init__(config)
        for block in self.blocks:
            block.attn = WindowAttention(config)
        self.reset_parameters()

    def initial_state(self, batch_size: int) -> SlidingWindowState:
        device = self.embed.weight.device
        return SlidingWindowState(
            prev_valid=torch.zeros(batch_size, dtype=torch.bool, device=device)
        )

    def read(self, x, state, resets, bptt, checkpoint):
        """All the blocks of the chunk in one pass per layer, instead of the loop over segments."""
        B, T, _ = x.shape
        w = self.config.segment_len
        P = state.cached()
        has_prev, p = (True, P - w) if P >= w else (False, P)
        n_blocks = -(-(p + T) // w)
        check_reset_columns(resets, p, w)

        # May query block c see block c − 1? Not before the stream's first block, nor across
        # a reset (resets fall on block starts).
        prev_valid = torch.ones(B, n_blocks, dtype=torch.bool, device=x.device)
        prev_valid[:, 0] = state.prev_valid if has_prev else False
        for c in sorted(reset_columns(resets)):
            prev_valid[:, (p + c) // w] &= ~resets[:, c]

        dtype = x.dtype
        cos, sin = self.rotary(2 * w, x)
        empty = x.new_zeros(B, self.config.n_heads, 0, self.config.head_dim)
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            past = WindowCache(
                empty if state.keys is None else state.keys[layer].to(dtype),
                empty if state.values is None else state.values[layer].to(dtype),
                prev_valid,
            )
            if checkpoint and torch.is_grad_enabled():
                x, k, v = activation_checkpoint(block, x, cos, sin, past, use_reentrant=False)
            else:
                x, k, v = block(x, cos, sin, past)
            new_keys.append(k)
            new_values.append(v)

        # Keep the previous complete block and the part of the current one read so far.
        p_end = (p + T) % w
        keep = w + p_end if (has_prev or p + T >= w) else p + T
        next_valid = prev_valid[:, -1] if p_end else torch.ones_like(prev_valid[:, -1])
        next_state = SlidingWindowState(
            prev_valid=next_valid,
            keys=torch.stack(new_keys)[:, :, :, -keep:],
            values=torch.stack(new_values)[:, :, :, -keep:],
        )
        return x, next_state
