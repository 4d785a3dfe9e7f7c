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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from foldformer.config import FoldedConfig

# ---------------------------------------------------------------------------------------------
# The state carried between calls
# ---------------------------------------------------------------------------------------------


@dataclass
class FoldState:
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

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def tokens_in_fold(self) -> int:
        """p: tokens of the current, incomplete segment already read."""
        return 0 if self.top is None else self.top.shape[1] - self.memory.shape[1]

    def _map(self, fn) -> FoldState:
        def opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return FoldState(fn(self.memory), opt(self.keys), opt(self.values), opt(self.top))

    def to(self, *args, **kwargs) -> FoldState:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> FoldState:
        return self._map(Tensor.detach)

    def index(self, rows: Tensor | slice | list[int]) -> FoldState:
        """The state of the chosen batch rows."""
        return FoldState(
            self.memory[rows],
            None if self.keys is None else self.keys[:, rows],
            None if self.values is None else self.values[:, rows],
            None if self.top is None else self.top[rows],
        )

    @classmethod
    def concat(cls, states: list[FoldState]) -> FoldState:
        """One state of all the rows of `states` (e.g. the micro-batches of a step)."""

        def cat(name: str, dim: int) -> Tensor | None:
            parts = [getattr(s, name) for s in states]
            return None if parts[0] is None else torch.cat(parts, dim=dim)

        return cls(cat("memory", 0), cat("keys", 1), cat("values", 1), cat("top", 0))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors by name, e.g. for ``safetensors.torch.save_file``."""
        tensors = {"memory": self.memory.contiguous()}
        for name in ("keys", "values", "top"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor]) -> FoldState:
        return cls(
            tensors["memory"], tensors.get("keys"), tensors.get("values"), tensors.get("top")
        )


@dataclass
class FoldedOutput:
    logits: Tensor  # (B, T, V), or (B, logits_to_keep, V)
    memory: FoldState  # pass back as `memory=` to continue the stream
    loss: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def make_norm(config: FoldedConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=1e-6)
    return nn.LayerNorm(config.d_model, bias=False)


def rotary_tables(
    n_positions: int, head_dim: int, base: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (n_positions, head_dim) for rotary position embeddings."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, N, head_dim) by the tables of the N positions it holds."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal self-attention over (B, heads, N, head_dim): a whole fold, no cache."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, config: FoldedConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, N, d) at positions P … P+N−1, where P = length of past_kv (0 if None).

        Returns the output and the keys/values of all P + N positions.
        """
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if past_kv is None:
            y = causal_attention(q, k, v, dropout)
        else:
            # New queries sit after P cached positions: SDPA's is_causal aligns top-left for
            # non-square masks, so the bottom-right causal mask is spelled out.
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
            P = k.shape[2] - N
            mask = torch.ones(N, P + N, dtype=torch.bool, device=x.device).tril(diagonal=P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, N, d)), k, v


class MLP(nn.Module):
    """The position-wise evolution of each token state."""

    def __init__(self, config: FoldedConfig):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        self.up = nn.Linear(config.d_model, config.d_ff * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = nn.ReLU() if config.activation == "relu" else nn.GELU(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, value = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * value)
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One step of time evolution: pre-norm attention and MLP, each with a residual."""

    def __init__(self, config: FoldedConfig):
        super().__init__()
        self.norm_attn, self.norm_mlp = make_norm(config), make_norm(config)
        self.attn, self.mlp = Attention(config), MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_kv: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn_out, k, v = self.attn(self.norm_attn(x), cos, sin, past_kv)
        x = x + self.drop(attn_out)
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        return x, k, v


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


class StreamingLM(nn.Module):
    """What every model of the project shares beyond `forward`: one-token steps, parameter
    counts and the save/load format. Subclasses set the three class attributes and
    `self.config`; those with other embeddings override `embedding_parameters`."""

    model_type: ClassVar[str] = ""  # written into config.json
    config_class: ClassVar[type] = FoldedConfig
    state_class: ClassVar[type] = FoldState  # what `.memory` holds

    def __init__(self, config) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got "
                f"{type(config).__name__}"
            )
        self.config = config

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Token embeddings and an untied head (left out of non-embedding counts)."""
        params = [self.embed.weight]
        if not self.config.tie_embeddings:
            params.append(self.head.weight)
        return params

    @torch.no_grad()
    def step(self, token_ids: Tensor, memory=None) -> FoldedOutput:
        """Read one token per row (B,), continuing `memory` (inside a fold: with its key/value
        cache); returns logits (B, V) for the next token. The path generation uses."""
        if token_ids.dim() != 1:
            raise ValueError(f"step takes token ids of shape (B,), got {tuple(token_ids.shape)}")
        out = self.forward(token_ids[:, None], memory)
        return FoldedOutput(logits=out.logits[:, -1], memory=out.memory)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops `embedding_parameters()`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embedding_parameters())
        return n

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (with model_type) and model.safetensors into directory."""
        save_pretrained(self, self.model_type, self.config, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """Load a model written by save_pretrained (safetensors only, nothing unpickled)."""
        return from_pretrained(cls, cls.model_type, cls.config_class, directory, device)


class FoldedTransformer(StreamingLM):
    """A decoder that reads unbounded streams through an (m + w)-position fold.

    Call it on a (B, T) LongTensor of any length; pass the returned ``.memory`` back with the
    next chunk to continue exactly where the stream stopped.
    """

    model_type = "folded"
    config_class = FoldedConfig
    state_class = FoldState

    def __init__(self, config: FoldedConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = make_norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.fold_in = FoldIn(config)
        self.memory_gate = MemoryGate(config) if config.memory_gate else None
        m0 = torch.zeros(config.memory_len, config.d_model)
        if config.learned_initial_memory:
            self.initial_memory = nn.Parameter(m0)
        else:
            self.register_buffer("initial_memory", m0)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2 and name != "initial_memory":
                nn.init.normal_(p, mean=0.0, std=std)
        # GPT-2: residual projections scaled by depth so the stream grows slowly with L.
        for block in self.blocks:
            for linear in (block.attn.proj, block.mlp.down):
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.n_layers))
        if self.fold_in.linear is not None:
            nn.init.eye_(self.fold_in.linear.weight)
        if self.memory_gate is not None:
            # bias 0: g = 0.5, half old, half new
            nn.init.constant_(self.memory_gate.linear.bias, self.config.gate_bias)
        if self.config.learned_initial_memory:
            nn.init.normal_(self.initial_memory, std=1.0)

    # -- state ------------------------------------------------------------------------------

    def initial_state(self, batch_size: int) -> FoldState:
        """The state of a fresh stream: memory M0 in every row, no partial fold."""
        memory = self.initial_memory.unsqueeze(0).expand(batch_size, -1, -1)
        return FoldState(memory=memory)

    def _reset_rows(self, state: FoldState, rows: Tensor) -> FoldState:
        if state.tokens_in_fold() != 0:
            raise ValueError(
                "reset_mask resets rows only on a fold boundary, but the state holds "
                f"{state.tokens_in_fold()} of {self.config.segment_len} tokens of the current "
                "segment"
            )
        fresh = self.initial_memory.unsqueeze(0).to(state.memory.dtype)
        return FoldState(memory=torch.where(rows[:, None, None], fresh, state.memory))

    # -- one fold ---------------------------------------------------------------------------

    def compile_fold(self, **compile_options) -> None:
        """torch.compile the whole-fold step (the hot path of training and prefill). One fold
        has fixed shapes, so it compiles once; the loop over folds stays in Python."""
        # The first fold of a call sees a memory that requires grad (M0, a previous fold) or
        # not (carried and detached): a few graph variants, more than dynamo's default budget.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._fold_step = torch.compile(self.complete_fold, **compile_options)

    def complete_fold(self, memory: Tensor, segment: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """A whole fold in one fused causal pass: final states of the m + w positions.
        cos/sin: rotary tables of the fold positions (computed once per call, not per fold)."""
        x = torch.cat([self.fold_in(memory).to(segment.dtype), segment], dim=1)
        top, _, _ = run_stack(self.blocks, x, (cos, sin))
        return top

    def partial_fold(
        self, state: FoldState, segment: Tensor, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, FoldState]:
        """Read part of a segment with the cache of the current fold; returns the new tokens'
        final states and the state with the cache extended."""
        if state.top is None:  # the fold starts here: memory rows go first
            x = torch.cat([self.fold_in(state.memory).to(segment.dtype), segment], dim=1)
            top, keys, values = run_stack(self.blocks, x, rope)
            new_top = top[:, self.config.memory_len :]
        else:
            new_top, keys, values = run_stack(
                self.blocks, segment, rope, (state.keys, state.values)
            )
            top = torch.cat([state.top, new_top], dim=1)
        return new_top, FoldState(state.memory, keys, values, top)

    # -- the recurrence ----------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        memory: FoldState | None = None,
        labels: Tensor | None = None,
        reset_mask: Tensor | None = None,
        bptt: int = 0,
        checkpoint: bool = False,
        logits_to_keep: int = 0,
        return_logits: bool = True,
    ) -> FoldedOutput:
        """Read a chunk of the stream.

        input_ids: (B, T) token ids, any T >= 1.
        memory: the state returned by the previous call, or None for fresh streams.
        labels: (B, T) targets aligned with input_ids (the token that should follow each
            position); -100 is ignored. The returned loss is their mean cross-entropy.
        reset_mask: (B,) bool, restart these rows from M0 before reading (document boundary);
            or (B, T) bool, restart a row before token t. Resets must fall on fold boundaries.
        bptt: detach the memory every `bptt` completed folds (0: backpropagate through all).
        checkpoint: recompute each complete fold in backward; only memories are kept.
        logits_to_keep: if > 0, compute logits for the last that many positions only.
        return_logits: False (with labels) computes the loss chunk by chunk, recomputing each
            chunk's logits in backward, so (B, T, V) logits never exist at once; .logits is None.
        """
        self._check_inputs(input_ids, memory, labels, reset_mask)
        B, T = input_ids.shape
        w, m = self.config.segment_len, self.config.memory_len
        state = memory if memory is not None else self.initial_state(B)
        if reset_mask is not None and reset_mask.dim() == 1:
            reset_mask = F.pad(reset_mask[:, None], (0, T - 1))
        resets_at = reset_columns(reset_mask)
        x = self.drop(self.embed(input_ids))
        # Every fold uses positions 0 … m+w−1: one rotary table for all the folds of the call.
        rope = self.rotary(m + min(w, state.tokens_in_fold() + T), x)

        tops, t, folds_done = [], 0, 0
        while t < T:
            if t in resets_at:
                state = self._reset_rows(state, reset_mask[:, t])
            p = state.tokens_in_fold()
            n = min(w - p, T - t)
            segment = x[:, t : t + n]
            if p == 0 and n == w:  # the common case: a whole fold in one fused pass
                fold_step = getattr(self, "_fold_step", self.complete_fold)
                if checkpoint and torch.is_grad_enabled():
                    top = activation_checkpoint(
                        fold_step, state.memory, segment, *rope, use_reentrant=False
                    )
                else:
                    top = fold_step(state.memory, segment, *rope)
                tops.append(top[:, m:])
                fold_top = top
            else:
                new_top, state = self.partial_fold(state, segment, rope)
                tops.append(new_top)
                fold_top = state.top
            t += n
            if p + n == w:  # segment complete: condense its last m final states
                new_memory = fold_top[:, fold_top.shape[1] - m :]
                if self.memory_gate is not None:
                    new_memory = self.memory_gate(state.memory, new_memory)
                state = FoldState(memory=new_memory)
                folds_done += 1
                if bptt and folds_done % bptt == 0:
                    state = state.detach()

        hidden = torch.cat(tops, dim=1)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
            labels = None if labels is None else labels[:, -logits_to_keep:]
        if not return_logits and labels is not None:
            return FoldedOutput(logits=None, memory=state, loss=self.chunked_loss(hidden, labels))
        logits = self.head(self.norm_out(hidden))
        loss = None if labels is None else language_model_loss(logits, labels)
        return FoldedOutput(logits=logits, memory=state, loss=loss)

    def rotary(self, n_positions: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary cos/sin tables for fold positions 0 … n_positions−1, in like's dtype."""
        config = self.config
        return rotary_tables(
            n_positions, config.head_dim, config.rope_base, like.device, like.dtype
        )

    def chunked_loss(self, hidden: Tensor, labels: Tensor, max_elements: int = 2**27) -> Tensor:
        """Mean cross-entropy of head(norm(hidden)) without holding all logits: each chunk of
        positions is checkpointed, so only one chunk's logits live at a time."""

        def chunk_loss_sum(h: Tensor, y: Tensor) -> Tensor:
            logits = self.head(self.norm_out(h)).float()
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                reduction="sum",
            )  # fmt: skip

        B, T, _ = hidden.shape
        step = max(1, max_elements // (B * self.config.vocab_size))
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, T, step):
            h, y = hidden[:, start : start + step], labels[:, start : start + step]
            if torch.is_grad_enabled():
                total = total + activation_checkpoint(chunk_loss_sum, h, y, use_reentrant=False)
            else:
                total = total + chunk_loss_sum(h, y)
        return total / (labels != -100).sum().clamp(min=1)

    # -- checks ------------------------------------------------------------------------------

    def _check_inputs(
        self,
        input_ids: Tensor,
        memory: FoldState | None,
        labels: Tensor | None,
        reset_mask: Tensor | None,
    ) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}"
            )
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range for vocab_size={self.config.vocab_size}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        if memory is not None:
            expected = (B, self.config.memory_len, self.config.d_model)
            if not isinstance(memory, FoldState):
                raise TypeError(
                    f"memory must be the FoldState returned by the model, got "
                    f"{type(memory).__name__}"
                )
            if tuple(memory.memory.shape) != expected:
                raise ValueError(
                    f"memory has shape {tuple(memory.memory.shape)}, expected (batch, memory_len, "
                    f"d_model) = {expected}"
                )
        if reset_mask is not None:
            if reset_mask.dtype != torch.bool or reset_mask.shape not in ((B,), (B, T)):
                raise ValueError(
                    f"reset_mask must be a bool tensor of shape ({B},) or ({B}, {T}), got "
                    f"{reset_mask.dtype} {tuple(reset_mask.shape)}"
                )


def run_stack(
    blocks: nn.ModuleList,
    x: Tensor,
    rope: tuple[Tensor, Tensor],
    cache: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run blocks over x (B, N, d) at positions P … P+N−1 (P = cached length); rope holds
    the rotary tables of at least positions 0 … P+N−1.

    Returns final-layer states (B, N, d) and the stacked keys/values (L, B, heads, P+N, hd).
    """
    P = 0 if cache is None else cache[0].shape[3]
    cos, sin = rope[0][P : P + x.shape[1]], rope[1][P : P + x.shape[1]]
    keys, values = [], []
    for layer, block in enumerate(blocks):
        past = None if cache is None else (cache[0][layer], cache[1][layer])
        x, k, v = block(x, cos, sin, past)
        keys.append(k)
        values.append(v)
    return x, torch.stack(keys), torch.stack(values)


def save_pretrained(model: nn.Module, model_type: str, config, directory: str | Path) -> None:
    """config.json (with model_type) and model.safetensors: the format of every model here."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"model_type": model_type, **config.to_dict()}, indent=2) + "\n"
    )
    save_model(model, str(directory / "model.safetensors"))


def from_pretrained(model_class, model_type: str, config_class, directory, device="cpu"):
    """Load what save_pretrained wrote (safetensors only, nothing unpickled)."""
    from safetensors.torch import load_model

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    values = json.loads(config_path.read_text())
    found = values.pop("model_type", "folded")
    if found != model_type:
        raise ValueError(f"{directory} holds a {found!r} model, not a {model_type!r} one")
    model = model_class(config_class.from_dict(values))
    load_model(model, str(directory / "model.safetensors"), device=str(device))
    return model.to(device)


def reset_columns(reset_mask: Tensor | None) -> set[int]:
    """Positions t where some row of a (B, T) reset mask restarts. Read once per call: asking
    `reset_mask[:, t].any()` fold by fold would make the GPU wait for the host every fold."""
    if reset_mask is None:
        return set()
    return set(reset_mask.any(dim=0).nonzero()[:, 0].tolist())


def language_model_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose label is not -100 (0 if there are none)."""
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return losses / (labels != -100).sum().clamp(min=1)
