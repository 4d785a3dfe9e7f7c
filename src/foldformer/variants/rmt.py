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
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from foldformer.model import FoldedOutput, reset_columns, rotary_tables, run_stack
from foldformer.variants.base import (
    VariantConfig,
    VariantModel,
    VariantState,
    check_state_type,
    check_token_inputs,
    expand_reset_mask,
)


@dataclass
class RMTConfig(VariantConfig):
    """segment_len: tokens per segment (w); memory_len: memory tokens (n)."""

    learned_initial_memory: bool = True  # False: the initial memory is a fixed zero block


@dataclass
class RMTState(VariantState):
    """memory: (B, n, d) memory tokens read by the current segment.
    keys, values: (L, B, heads, n + p, head_dim) of the current segment so far, or None on a
    segment boundary (p = 0)."""

    memory: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None

    BATCH_DIMS: ClassVar[dict[str, int]] = {"memory": 0, "keys": 1, "values": 1}

    def tokens_in_segment(self) -> int:
        return 0 if self.keys is None else self.keys.shape[3] - self.memory.shape[1]


class RecurrentMemoryTransformer(VariantModel):
    """Memory tokens read at the start and written at the end of every segment."""

    model_type: ClassVar[str] = "rmt"
    config_class: ClassVar[type[VariantConfig]] = RMTConfig
    state_class: ClassVar[type[VariantState]] = RMTState

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
        P, c = (0 if cache is None else cache[0].shape[3]), self.config
        rope = rotary_tables(P + x.shape[1], c.head_dim, c.rope_base, x.device, x.dtype)
        return run_stack(self.blocks, x, rope, cache)

    def complete_segment(self, memory: Tensor, segment: Tensor) -> tuple[Tensor, Tensor]:
        """[read M, segment, write M] in one causal pass: the segment's final states and the
        next memory."""
        memory = memory.to(segment.dtype)
        n = memory.shape[1]
        top, _, _ = self.run_blocks(torch.cat([memory, segment, memory], dim=1))
        return top[:, n : top.shape[1] - n], self.norm_out(top[:, top.shape[1] - n :])

    def forward(
        self,
        input_ids: Tensor,
        memory: RMTState | None = None,
        labels: Tensor | None = None,
        reset_mask: Tensor | None = None,
        bptt: int = 0,
        checkpoint: bool = False,
        logits_to_keep: int = 0,
    ) -> FoldedOutput:
        """Read a chunk of the stream (same arguments as FoldedTransformer.forward).

        bptt: detach the memory every `bptt` completed segments (0: backpropagate through
        all). checkpoint recomputes each complete segment in backward. Resets (restart a row
        from M0) must fall on segment boundaries.
        """
        check_token_inputs(input_ids, labels, reset_mask, self.config.vocab_size)
        B, T = input_ids.shape
        check_state_type(memory, RMTState, B)
        w, n = self.config.segment_len, self.config.memory_len
        state = memory if memory is not None else self.initial_state(B)
        resets = expand_reset_mask(reset_mask, T)
        resets_at = reset_columns(resets)
        x = self.drop(self.embed(input_ids))

        outputs, t, segments_done = [], 0, 0
        while t < T:
            p = state.tokens_in_segment()
            if t in resets_at:
                if p != 0:
                    raise ValueError(
                        "reset_mask resets rows only on a segment boundary, but the state holds "
                        f"{p} of {w} tokens of the current segment"
                    )
                fresh = self.initial_memory.unsqueeze(0).to(state.memory.dtype)
                state = RMTState(memory=torch.where(resets[:, t, None, None], fresh, state.memory))
            k = min(w - p, T - t)
            segment = x[:, t : t + k]
            if p == 0 and k == w:  # the common case: read, segment and write in one pass
                if checkpoint and torch.is_grad_enabled():
                    out, new_memory = activation_checkpoint(
                        self.complete_segment, state.memory, segment, use_reentrant=False
                    )
                else:
                    out, new_memory = self.complete_segment(state.memory, segment)
            else:
                read = state.memory.to(segment.dtype)
                if p == 0:  # the segment starts here: the read memory goes first
                    top, keys, values = self.run_blocks(torch.cat([read, segment], dim=1))
                    out = top[:, n:]
                else:
                    out, keys, values = self.run_blocks(segment, (state.keys, state.values))
                new_memory = None
                if p + k == w:  # complete: the write tokens read the whole segment
                    written, _, _ = self.run_blocks(read, (keys, values))
                    new_memory = self.norm_out(written)
                else:
                    state = RMTState(state.memory, keys, values)
            outputs.append(out)
            t += k
            if new_memory is not None:
                state = RMTState(memory=new_memory)
                segments_done += 1
                if bptt and segments_done % bptt == 0:
                    state = state.detach()

        logits, loss = self.logits_and_loss(torch.cat(outputs, dim=1), labels, logits_to_keep)
        return FoldedOutput(logits=logits, memory=state, loss=loss)
