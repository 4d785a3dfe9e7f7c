"""The blocks every in-house model is built from: norms, rotary positions, attention (the kernel
chosen by ``config.attention`` from a table), MLP, block, stack, and `TransformerLM`, the
embeddings + blocks + head base of the folded model and the baselines (so a comparison measures
the recurrence, not a different block).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foldformer.config import ConfigError
from foldformer.streaming import StreamingLM

if TYPE_CHECKING:
    from foldformer.config import TransformerConfig


def make_norm(config: TransformerConfig) -> nn.Module:
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
    """Rotate (..., N, head_dim) by the tables of the N positions it holds."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# Attention kernels: kernel(q, k, v, mask, dropout_p) -> (..., N, head_dim)
#   q (..., N, head_dim) are the last N positions of k, v (..., S, head_dim). mask: None for
#   causal attention (bottom-right aligned when S > N), or a bool mask broadcastable to
#   (..., N, S), True where a query may attend. Every kernel computes the same function.
# ---------------------------------------------------------------------------------------------


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """(N, S) bool: query i, at position S − N + i, sees keys 0 … S − N + i."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """torch's scaled_dot_product_attention (fused kernels where the device has them)."""
    if mask is None and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if mask is None:  # SDPA's is_causal aligns top-left for non-square masks: spell it out
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d) (..., N, S) under the kernels' mask convention, in float32 at least:
    the weights every kernel applies (eager attention and foldformer.explain read them)."""
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=softmax_dtype)


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """softmax(q kᵀ / √d) v written out, softmax in float32 at least: the definition."""
    weights = attention_weights(q, k, mask).to(q.dtype)
    weights = F.dropout(weights, dropout_p) if dropout_p else weights
    return weights @ v


def flex_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """FlexAttention (torch.nn.attention.flex_attention); fused when compiled. No dropout
    (the config refuses it) and, on a CPU, no backward (torch raises)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    *lead, N, D = q.shape
    S = k.shape[-2]
    flat = [t.reshape(-1, 1, t.shape[-2], D) for t in (q, k, v)]  # any leading dims
    if mask is None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx <= q_idx + (S - N), score, -float("inf"))

    else:
        keep = mask.expand(*lead, N, S).reshape(-1, N, S)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(keep[b, q_idx, kv_idx], score, -float("inf"))

    return flex(*flat, score_mod=score_mod).view(*lead, N, D)


# name -> kernel; `config.attention` picks one (Hugging Face's attention-function table).
ATTENTION: dict[str, Callable[..., Tensor]] = {
    "sdpa": sdpa_attention,
    "eager": eager_attention,
    "flex": flex_attention,
}


def register_attention(name: str, kernel: Callable[..., Tensor]) -> None:
    """Add a kernel to the table (e.g. a benchmark's), selectable as ``attention=name``."""
    if not name or not callable(kernel):
        raise ConfigError(f"register_attention needs a name and a callable, got {name!r}")
    ATTENTION[name] = kernel


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout
        self.kernel = ATTENTION[config.attention]

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
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        y = self.kernel(q, k, v, None, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, d)), k, v


class MLP(nn.Module):
    """The position-wise evolution of each token state."""

    def __init__(self, config: TransformerConfig):
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

    def __init__(self, config: TransformerConfig):
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


# ---------------------------------------------------------------------------------------------
# The in-house model base
# ---------------------------------------------------------------------------------------------


class TransformerLM(StreamingLM):
    """Token embeddings, the `Block` stack, the final norm and the head, GPT-2 initialised:
    what the folded model and the in-house baselines share. Subclasses add their memory and
    call `reset_parameters` once their modules exist."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = make_norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def reset_parameters(self, skip: tuple[str, ...] = ()) -> None:
        """N(0, init_std) for every matrix but `skip`, residual projections scaled by depth
        (GPT-2: the stream grows slowly with L), then the head tied to the embeddings."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2 and name not in skip:
                nn.init.normal_(p, mean=0.0, std=std)
        for block in self.blocks:
            for linear in (block.attn.proj, block.mlp.down):
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.n_layers))
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def embedding_parameters(self) -> list[nn.Parameter]:
        params = [self.embed.weight]
        if not self.config.tie_embeddings:
            params.append(self.head.weight)
        return params

    def inputs(self, input_ids: Tensor) -> Tensor:
        return self.drop(self.embed(input_ids))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.norm_out(hidden))

    def rotary(self, n_positions: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary cos/sin tables for positions 0 … n_positions−1, in like's dtype."""
        c = self.config
        return rotary_tables(n_positions, c.head_dim, c.rope_base, like.device, like.dtype)
