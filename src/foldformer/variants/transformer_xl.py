"""Transformer-XL (Dai et al. 2019) from the shared blocks (DESIGN.md §5).

Each layer l attends to m cached states of the previous segment(s) *at that layer* (the
inputs of layer l, gradient stopped) plus the current segment, causally. The cached states are
not re-evolved: layer l's cache is only ever read by layer l. Positions are rotary over the
m + w positions of a segment (cache at 0 … m−1, segment at m … m+w−1), so they depend on
distance only, as XL's relative encoding intends::

    mem[l] = zeros(m, d)                 # as Hugging Face's TransfoXL initialises its mems
    for each segment S_k:
        h = embed(S_k)
        for l, block in enumerate(blocks):
            inputs[l] = h
            h = block(h, keys/values of [stopgrad(mem[l]), h])
        logits_k = head(norm(h))
        mem[l] = concat(mem[l], inputs[l])[-m:].detach()

The gradient never crosses a segment boundary (bptt has no effect); the context at inference
is about m·L tokens. A stream that stops mid-segment keeps the keys/values of the cache and of
the partial segment, so chunked streaming equals one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from foldformer.model import FoldedOutput, reset_columns, rotary_tables
from foldformer.variants.base import (
    VariantConfig,
    VariantModel,
    VariantState,
    check_state_type,
    check_token_inputs,
    expand_reset_mask,
    memory_key_values,
)


@dataclass
class TransformerXLConfig(VariantConfig):
    """segment_len: tokens per segment (w); memory_len: cached states per layer (m)."""


@dataclass
class TransformerXLState(VariantState):
    """memory: (B, L, m, d) cached inputs of each layer (no gradient).
    keys, values: (L, B, heads, m + p, head_dim) of the current segment so far, or None on a
    segment boundary (p = 0). inputs: (B, L, p, d) each layer's inputs for those p tokens.
    (Batch first except for keys/values, as in FoldState.)"""

    memory: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None
    inputs: Tensor | None = None

    BATCH_DIMS: ClassVar[dict[str, int]] = {"memory": 0, "keys": 1, "values": 1, "inputs": 0}

    def tokens_in_segment(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[2]


class TransformerXL(VariantModel):
    """Segment-level recurrence with a per-layer cache of the previous segment's states."""

    model_type: ClassVar[str] = "transformer_xl"
    config_class: ClassVar[type[VariantConfig]] = TransformerXLConfig
    state_class: ClassVar[type[VariantState]] = TransformerXLState

    def __init__(self, config: TransformerXLConfig):
        super().__init__(config)
        self.reset_parameters()

    def initial_state(self, batch_size: int) -> TransformerXLState:
        c = self.config
        weight = self.embed.weight
        memory = weight.new_zeros(batch_size, c.n_layers, c.memory_len, c.d_model)
        return TransformerXLState(memory=memory)

    def run_segment(
        self,
        x: Tensor,
        memory: Tensor,
        cache: tuple[Tensor, Tensor] | None = None,
        p: int = 0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run the stack over x (B, N, d), tokens p … p+N−1 of a segment.

        cache: keys/values (L, B, h, m + p, hd) of the segment so far, or None when p = 0 (the
        cached states' keys/values are then computed from `memory`). Returns the final states,
        keys and values of all m + p + N positions, and each layer's inputs (B, L, N, d).
        """
        m, N = self.config.memory_len, x.shape[1]
        cos, sin = rotary_tables(
            m + p + N, self.config.head_dim, self.config.rope_base, x.device, x.dtype
        )
        keys, values, inputs = [], [], []
        for layer, block in enumerate(self.blocks):
            if cache is not None:
                past = (cache[0][layer], cache[1][layer])
            elif m > 0:
                past = memory_key_values(block, memory[:, layer].to(x.dtype), cos[:m], sin[:m])
            else:
                past = None
            inputs.append(x)
            x, k, v = block(x, cos[m + p :], sin[m + p :], past)
            keys.append(k)
            values.append(v)
        return x, torch.stack(keys), torch.stack(values), torch.stack(inputs, dim=1)

    def forward(
        self,
        input_ids: Tensor,
        memory: TransformerXLState | None = None,
        labels: Tensor | None = None,
        reset_mask: Tensor | None = None,
        bptt: int = 0,
        checkpoint: bool = False,
        logits_to_keep: int = 0,
    ) -> FoldedOutput:
        """Read a chunk of the stream (same arguments as FoldedTransformer.forward).

        bptt is accepted and has no effect: the cache is always gradient-stopped.
        checkpoint recomputes each complete segment in backward. Resets (restart a row from
        the zero cache) must fall on segment boundaries.
        """
        check_token_inputs(input_ids, labels, reset_mask, self.config.vocab_size)
        B, T = input_ids.shape
        check_state_type(memory, TransformerXLState, B)
        w, m = self.config.segment_len, self.config.memory_len
        state = memory if memory is not None else self.initial_state(B)
        resets = expand_reset_mask(reset_mask, T)
        resets_at = reset_columns(resets)
        x = self.drop(self.embed(input_ids))

        outputs, t = [], 0
        while t < T:
            p = state.tokens_in_segment()
            if t in resets_at:
                if p != 0:
                    raise ValueError(
                        "reset_mask resets rows only on a segment boundary, but the state holds "
                        f"{p} of {w} tokens of the current segment"
                    )
                fresh = torch.zeros_like(state.memory)
                state = TransformerXLState(
                    memory=torch.where(resets[:, t, None, None, None], fresh, state.memory)
                )
            n = min(w - p, T - t)
            segment = x[:, t : t + n]
            if p == 0 and n == w and checkpoint and torch.is_grad_enabled():
                out, keys, values, inputs = activation_checkpoint(
                    self.run_segment, segment, state.memory, use_reentrant=False
                )
            elif p == 0:
                out, keys, values, inputs = self.run_segment(segment, state.memory)
            else:
                cache = (state.keys, state.values)
                out, keys, values, inputs = self.run_segment(segment, state.memory, cache, p)
                inputs = torch.cat([state.inputs, inputs], dim=2)
            outputs.append(out)
            t += n
            if p + n == w:  # segment complete: each layer caches its last m inputs
                cached = torch.cat([state.memory.to(inputs.dtype), inputs], dim=2)
                state = TransformerXLState(memory=cached[:, :, cached.shape[2] - m :].detach())
            else:
                state = TransformerXLState(state.memory, keys, values, inputs)

        logits, loss = self.logits_and_loss(torch.cat(outputs, dim=1), labels, logits_to_keep)
        return FoldedOutput(logits=logits, memory=state, loss=loss)
