"""Recurrent Memory Transformer (Bulatov et al. 2022), decoder form, from the shared blocks.

n = memory_len memory tokens are read at the start of a segment and written at its end: the
stack runs over [M, S_k, M] under one causal mask (rotary positions 0 … 2n+w−1), the segment's
tokens see the read memory, the write positions see the whole segment, and their final
states (after the final norm, as the GPT-2 based RMT takes ``hidden_states[-1]``) become the
next segment's memory::

    M = M0                                    # learned, n × d
    for each segment S_k:
        H = blocks(concat(M, embed(S_k), M))
        logits_k = head(norm(H[n : n + w]))
        M = norm(H[-n:])

Gradients flow through M from segment to segment (truncated every `bptt` segments), so the
context at inference is unbounded. A stream that stops mid-segment keeps the keys/values of
the partial segment; the write tokens run when the segment completes, so chunking never
changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from foldformer.config import TransformerConfig
from foldformer.layers import TransformerLM, run_stack
from foldformer.streaming import StreamState


@dataclass
class RMTConfig(TransformerConfig):
    """segment_len: tokens per segment (w); memory_len: memory tokens (n)."""

    learned_initial_memory: bool = True  # False: the initial memory is a fixed zero block


@dataclass
class RMTState(StreamState):
    """memory: (B, n, d) memory tokens read by the current segment.
    keys, values: (L, B, heads, n + p, head_dim) of the current segment so far, or None on a
    segment boundary (p = 0)."""

    memory: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None

    BATCH_DIMS: ClassVar[dict[str, int]] = {"memory": 0, "keys": 1, "values": 1}

    def tokens_in_segment(self) -> int:
        return 0 if self.keys is None else self.keys.shape[3] - self.memory.shape[1]


class RecurrentMemoryTransformer(TransformerLM):
    """Memory tokens read at the start and written at the end of every segment; resets
    restart a row from M0."""

    model_type: ClassVar[str] = "rmt"
    config_class: ClassVar[type] = RMTConfig
    state_class: ClassVar[type] = RMTState

    def __init__(self, config: RMTConfig):
        super().__init__(config)
        m0 = torch.zeros(config.memory_len, config.d_model)
        if config.learned_initial_memory:
            self.initial_memory = nn.Parameter(m0)
        else:
            self.register_buffer("initial_memory", m0)
        self.reset_parameters()  # initial_memory: N(0, init_std), like a token embedding

    def initial_state(self, batch_size: int) -> RMTState:
        return RMTState(memory=self.initial_memory.unsqueeze(0).expand(batch_size, -1, -1))

    def run_blocks(
        self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the stack over x (B, N, d) at positions P … P+N−1 (P = cached length)."""
        P = 0 if cache is None else cache[0].shape[3]
        return run_stack(self.blocks, x, self.rotary(P + x.shape[1], x), cache)

    # -- one segment: what the segment driver calls --------------------------------------------

    def complete_fold(self, memory: Tensor, segment: Tensor) -> Tensor:
        """[read M, segment, write M] in one causal pass: their final states (B, 2n + w, d)."""
        return self.run_blocks(torch.cat([memory, segment, memory], dim=1))[0]

    def whole_segment(self, state, segment, context):
        """The segment's final states and the next memory (`complete_fold`, compiled by
        `compile_fold`)."""
        memory = state.memory.to(segment.dtype)
        n = memory.shape[1]
        top = self.fold_step(memory, segment)
        new_memory = self.norm_out(top[:, top.shape[1] - n :])
        return top[:, n : top.shape[1] - n], RMTState(memory=new_memory)

    def partial_segment(self, state, segment, context):
        if state.keys is None:  # the segment starts here: the read memory goes first
            read = state.memory.to(segment.dtype)
            top, keys, values = self.run_blocks(torch.cat([read, segment], dim=1))
            out = top[:, read.shape[1] :]
        else:
            out, keys, values = self.run_blocks(segment, (state.keys, state.values))
        return out, RMTState(state.memory, keys, values)

    def condense(self, state: RMTState) -> RMTState:
        """The write tokens read the whole segment through its cache: the next memory."""
        read = state.memory.to(self.embed.weight.dtype)  # the dtype of the segment's inputs
        written, _, _ = self.run_blocks(read, (state.keys, state.values))
        return RMTState(memory=self.norm_out(written))
