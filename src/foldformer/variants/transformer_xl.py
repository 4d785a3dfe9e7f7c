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

from foldformer.config import TransformerConfig
from foldformer.layers import Block, TransformerLM, apply_rotary
from foldformer.streaming import StreamState


@dataclass
class TransformerXLConfig(TransformerConfig):
    """segment_len: tokens per segment (w); memory_len: cached states per layer (m)."""


@dataclass
class TransformerXLState(StreamState):
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


class TransformerXL(TransformerLM):
    """Segment-level recurrence with a per-layer cache of the previous segment's states.

    bptt has no effect (the cache is always gradient-stopped); resets restart a row from the
    zero cache.
    """

    model_type: ClassVar[str] = "transformer_xl"
    config_class: ClassVar[type] = TransformerXLConfig
    state_class: ClassVar[type] = TransformerXLState

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
        cos, sin = self.rotary(m + p + N, x)
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

    # -- one segment: what the segment driver calls --------------------------------------------

    def whole_segment(self, state, segment, context):
        out, _, _, inputs = self.run_segment(segment, state.memory)
        return out, self.condense(TransformerXLState(state.memory, inputs=inputs))

    def partial_segment(self, state, segment, context):
        p = state.tokens_in_segment()
        cache = None if p == 0 else (state.keys, state.values)
        out, keys, values, inputs = self.run_segment(segment, state.memory, cache, p)
        if p:
            inputs = torch.cat([state.inputs, inputs], dim=2)
        return out, TransformerXLState(state.memory, keys, values, inputs)

    def condense(self, state: TransformerXLState) -> TransformerXLState:
        """Each layer caches its last m inputs, gradient stopped."""
        cached = torch.cat([state.memory.to(state.inputs.dtype), state.inputs], dim=2)
        m = self.config.memory_len
        return TransformerXLState(memory=cached[:, :, cached.shape[2] - m :].detach())
