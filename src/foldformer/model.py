"""The folded-context transformer (DESIGN.md §3), readable top to bottom.

A decoder reads a stream in segments of w tokens. Each fold runs the L blocks once over
m + w positions: the m final-layer states kept from the previous fold ("memory", folded
back to the input of the stack) followed by the w new tokens, under one causal mask with
rotary positions 0 … m+w−1. The last m final-layer states become the next memory::

    M = M0
    for each segment S_k:
        H = blocks(concat(fold_in(M), embed(S_k)))
        logits_k = head(norm(H[m:]))
        M = H[-m:]

A stream may stop in the middle of a segment: the state then keeps the keys/values and
final-layer states of the partial fold, so the next call completes it and chunk boundaries
never change the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foldformer.config import FoldedConfig

# The blocks, the driver and the output moved to layers.py and streaming.py; their names stay
# importable from here, where they were.
from foldformer.layers import (  # noqa: F401
    Attention,
    Block,
    TransformerLM,
    apply_rotary,
    make_norm,
    rotary_tables,
    run_stack,
)
from foldformer.layers import sdpa_attention as causal_attention  # noqa: F401
from foldformer.streaming import (  # noqa: F401
    FoldedOutput,
    StreamingLM,
    StreamState,
    language_model_loss,
    reset_columns,
)


@dataclass
class FoldState(StreamState):
    """Everything a stream needs to continue: plain tensors, indexable by batch row.

    memory: (B, m, d) final-layer states that entered the current fold (before fold_in).
    keys, values: (L, B, heads, m + p, head_dim) attention cache of the current fold, or None
        when the stream sits exactly on a fold boundary (p = 0).
    top: (B, m + p, d) final-layer states of the current fold so far, or None when p = 0.
    Here p is the number of tokens of the current segment already read (same for every row).
    """

    memory: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None
    top: Tensor | None = None

    BATCH_DIMS: ClassVar[dict[str, int]] = {"memory": 0, "keys": 1, "values": 1, "top": 0}

    def tokens_in_segment(self) -> int:
        return 0 if self.top is None else self.top.shape[1] - self.memory.shape[1]

    tokens_in_fold = tokens_in_segment


# ---------------------------------------------------------------------------------------------
# What the fold adds to the blocks (foldformer.layers)
# ---------------------------------------------------------------------------------------------


def clamped_stretched_sigmoid(x: Tensor, stretch: float = 0.1) -> Tensor:
    """clamp((1 + 2s) sigmoid(x) - s, 0, 1) forward, so g is exactly 0 or 1 once sigmoid(x) is
    within s/(1 + 2s) of either end; backward: the gradient of the unclamped stretch, so a gate
    held shut or open still learns (straight-through, Bengio et al. 2013)."""
    soft = (1 + 2 * stretch) * torch.sigmoid(x) - stretch
    return soft + (soft.clamp(0, 1) - soft).detach()


GATE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
    "clamp_st": clamped_stretched_sigmoid,
}


class MemoryGate(nn.Module):
    """Optional (not in the note): mix the old memory into the new one, LSTM-style.

    g = act(W [norm(old); norm(new)] + b) per channel; next = g * old + (1 - g) * new.
    A convex mix of two bounded states stays bounded, so invariant 3 holds. act is a sigmoid
    (g < 1: kept content decays as g^k) or one that reaches g = 1 and so holds a channel
    exactly: the hard sigmoid, or a clamped stretched sigmoid (clamp_st).
    """

    def __init__(self, config: FoldedConfig):
        super().__init__()
        self.norm_old, self.norm_new = make_norm(config), make_norm(config)
        self.linear = nn.Linear(2 * config.d_model, config.d_model)
        self.activation = GATE_ACTIVATIONS[config.gate_activation]

    def gate(self, old: Tensor, new: Tensor) -> Tensor:
        """g (B, m, d): the share of the old memory kept, per row and channel."""
        gate_in = torch.cat([self.norm_old(old), self.norm_new(new)], dim=-1)
        return self.activation(self.linear(gate_in.to(self.linear.weight.dtype))).to(new.dtype)

    def forward(self, old: Tensor, new: Tensor) -> Tensor:
        gate = self.gate(old, new)
        return gate * old.to(new.dtype) + (1 - gate) * new


class FoldIn(nn.Module):
    """Maps a top-of-stack state back to the input of the stack.

    The residual stream grows with depth and the fold repeats without end, so re-entry is
    normalised: the output norm is fixed by the gain (and the optional linear map) whatever
    the input, which bounds the memory over any number of folds. "none" is raw re-entry,
    kept for ablations only.
    """

    def __init__(self, config: FoldedConfig):
        super().__init__()
        self.variant = config.fold_in
        self.norm = make_norm(config) if self.variant != "none" else nn.Identity()
        self.linear = None
        if self.variant == "norm_linear":
            self.linear = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, memory: Tensor) -> Tensor:
        x = self.norm(memory)
        return x if self.linear is None else self.linear(x)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class FoldedTransformer(TransformerLM):
    """A decoder that reads unbounded streams through an (m + w)-position fold.

    Call it on a (B, T) LongTensor of any length; pass the returned ``.memory`` back with the
    next chunk to continue exactly where the stream stopped. The loop over folds, resets,
    truncation and checkpointing are the segment driver's (foldformer.streaming); this class
    is one fold.
    """

    model_type = "folded"
    config_class = FoldedConfig
    state_class = FoldState

    def __init__(self, config: FoldedConfig):
        super().__init__(config)
        self.fold_in = FoldIn(config)
        self.memory_gate = MemoryGate(config) if config.memory_gate else None
        # memory_write: the write positions' inputs, N(0, init_std) like token embeddings
        self.write_tokens = None
        if config.memory_write:
            self.write_tokens = nn.Parameter(torch.zeros(config.memory_len, config.d_model))
        m0 = torch.zeros(config.memory_len, config.d_model)
        if config.learned_initial_memory:
            self.initial_memory = nn.Parameter(m0)
        else:
            self.register_buffer("initial_memory", m0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters(skip=("initial_memory",))
        if self.fold_in.linear is not None:
            nn.init.eye_(self.fold_in.linear.weight)
        if self.memory_gate is not None:
            # bias 0: g = 0.5, half old, half new
            nn.init.constant_(self.memory_gate.linear.bias, self.config.gate_bias)
        if self.config.learned_initial_memory:
            nn.init.normal_(self.initial_memory, std=1.0)

    def initial_state(self, batch_size: int) -> FoldState:
        """The state of a fresh stream: memory M0 in every row, no partial fold."""
        return FoldState(memory=self.initial_memory.unsqueeze(0).expand(batch_size, -1, -1))

    def stream_phase(self, position: int) -> int:
        """Every fold starts from a memory and uses positions 0 … m+w−1, so two streams at
        the same place in their folds compute alike, whatever fold each is in."""
        return position % self.config.segment_len

    # -- one fold: what the segment driver calls ----------------------------------------------

    @property
    def write_len(self) -> int:
        """Write positions after the segment in every fold (memory_write: m, else 0)."""
        return 0 if self.write_tokens is None else self.config.memory_len

    def chunk_context(self, x: Tensor, state: FoldState) -> tuple[Tensor, Tensor]:
        """Every fold uses positions 0 … m+w−1 (and the write positions after them): one rotary
        table for all the folds of a call."""
        w, m = self.config.segment_len, self.config.memory_len
        n = m + min(w, state.tokens_in_segment() + x.shape[1]) + self.write_len
        return self.rotary(n, x)

    def complete_fold(self, memory: Tensor, segment: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """A whole fold in one fused causal pass: final states of the m + w positions (and of
        the write positions after them, with memory_write).

        memory (B, m, d), segment (B, w, d) embeddings; cos/sin: rotary tables of the fold.
        """
        parts = [self.fold_in(memory).to(segment.dtype), segment]
        if self.write_tokens is not None:
            parts.append(self.write_tokens.to(segment.dtype).expand(segment.shape[0], -1, -1))
        top, _, _ = run_stack(self.blocks, torch.cat(parts, dim=1), (cos, sin))  # one causal mask
        return top  # (B, m + w [+ m], d) final-layer states

    def whole_segment(self, state: FoldState, segment: Tensor, rope) -> tuple[Tensor, FoldState]:
        top = self.fold_step(state.memory, segment, *rope)  # (B, m + w [+ m], d)
        m, w = self.config.memory_len, self.config.segment_len
        return top[:, m : m + w], self.condense(FoldState(state.memory, top=top))

    def partial_segment(self, state: FoldState, segment: Tensor, rope) -> tuple[Tensor, FoldState]:
        """Part of a segment (B, n, d) with the cache of the current fold: the new tokens'
        final states and the state with the cache extended."""
        if state.top is None:  # the fold starts here: memory rows go first
            x = torch.cat([self.fold_in(state.memory).to(segment.dtype), segment], dim=1)
            top, keys, values = run_stack(self.blocks, x, rope)
            new_top = top[:, self.config.memory_len :]
        else:
            cache = (state.keys, state.values)
            new_top, keys, values = run_stack(self.blocks, segment, rope, cache)
            top = torch.cat([state.top, new_top], dim=1)
        return new_top, FoldState(state.memory, keys, values, top)

    def condense(self, state: FoldState) -> FoldState:
        """The next memory: the fold's last m final-layer states (optionally gated); with
        memory_write the write positions' states, with memory_fifo the newest w states
        entering a FIFO."""
        c, top, old = self.config, state.top, state.memory
        if self.write_tokens is not None and state.keys is not None:
            # the fold was read chunk by chunk: its write positions read it through the cache
            write = self.write_tokens.to(top.dtype).expand(top.shape[0], -1, -1)
            rope = self.rotary(top.shape[1] + self.write_len, top)
            top, _, _ = run_stack(self.blocks, write, rope, (state.keys, state.values))
        n = c.segment_len if c.memory_fifo else c.memory_len  # rows that enter this fold
        new_memory = top[:, top.shape[1] - n :]  # (B, n, d)
        if self.memory_gate is not None:
            new_memory = self.memory_gate(old[:, old.shape[1] - n :], new_memory)
        if n < c.memory_len:  # FIFO: the oldest n rows leave, the others are kept as they are
            new_memory = torch.cat([old[:, n:].to(new_memory.dtype), new_memory], dim=1)
        if self.training and c.memory_noise:
            rms = new_memory.pow(2).mean(dim=-1, keepdim=True).sqrt()
            new_memory = new_memory + c.memory_noise * rms * torch.randn_like(new_memory)
        return FoldState(memory=new_memory)
