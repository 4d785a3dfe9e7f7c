"""Streaming inference for any model that follows the project's protocol.

A folded model reads an unbounded stream through a fixed (m + w)-position fold, so a context of a
million tokens costs the memory of one chunk. These helpers feed a context chunk by chunk under
``torch.no_grad()`` and ask for logits only where they are needed (``logits_to_keep``), so peak
memory does not grow with the context length::

    state = ingest(model, context_ids)                       # constant memory for any length
    answer = greedy_generate(model, question_ids, 8, memory=state)
    losses = score(model, context_ids, target_ids)           # per-token losses of the targets

They work the same for a full-attention model (``segment_len`` huge, ``memory_len`` 0): its state
is a growing key/value cache, as its design implies.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

DEFAULT_CHUNK_TOKENS = 2048


def default_chunk_size(model: nn.Module, target: int = DEFAULT_CHUNK_TOKENS) -> int:
    """About `target` tokens, rounded down to whole folds so most chunks run fused folds."""
    w = int(model.config.segment_len)
    if w >= target:
        return target
    return max(1, target // w) * w


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_batch(ids: Tensor | Iterable[int], device: torch.device, name: str) -> Tensor:
    """(T,) or (B, T) ids -> (B, T) long tensor on the model's device."""
    if not isinstance(ids, Tensor):
        ids = torch.tensor(list(ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (T,) or (batch, T), got {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.long)


@torch.no_grad()
def ingest(
    model: nn.Module,
    input_ids: Tensor | Iterable[int],
    memory=None,
    chunk_size: int | None = None,
    progress: bool = False,
):
    """Read a context into the model's streaming state without keeping any logits.

    input_ids: (T,) or (B, T). memory: a state to continue, or None for a fresh stream.
    chunk_size: tokens per forward call (default about 2K, whole folds); peak memory is that of
    one chunk for a folded model. Returns the state to pass as ``memory=`` to the next call.
    An empty context returns `memory` unchanged.
    """
    ids = _as_batch(input_ids, _device(model), "input_ids")
    chunk_size = chunk_size or default_chunk_size(model)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    T = ids.shape[1]
    bar = tqdm(total=T, unit="tok", unit_scale=True, desc="ingest", disable=not progress)
    for start in range(0, T, chunk_size):
        chunk = ids[:, start : start + chunk_size]
        # logits_to_keep=1: the head runs on one position only, the chunk's states are dropped.
        memory = model(chunk, memory=memory, logits_to_keep=1).memory
        bar.update(chunk.shape[1])
    bar.close()
    return memory


@torch.no_grad()
def stream_losses(
    model: nn.Module,
    input_ids: Tensor | Iterable[int],
    memory=None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, object]:
    """Per-token losses of a stream: entry t is -log p(x_{t+1} | x_1..x_t) (and the state).

    input_ids (T,) or (B, T) -> losses (B, T-1) float32 on the model's device, and the state
    after reading all T tokens. Logits exist for one chunk at a time only.
    """
    ids = _as_batch(input_ids, _device(model), "input_ids")
    B, T = ids.shape
    if chunk_size is None:
        # Logits are (B, chunk, V) floats: keep them near 2**26 elements (256 MB).
        budget = max(1, 2**26 // (B * int(model.config.vocab_size)))
        chunk_size = default_chunk_size(model, min(DEFAULT_CHUNK_TOKENS, budget))
    losses = []
    bar = tqdm(total=T, unit="tok", unit_scale=True, desc="score", disable=not progress)
    for start in range(0, T, chunk_size):
        chunk = ids[:, start : start + chunk_size]
        out = model(chunk, memory=memory)
        memory = out.memory
        targets = ids[:, start + 1 : start + 1 + chunk.shape[1]]
        logits = out.logits[:, : targets.shape[1]].float()
        losses.append(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(B, -1)
        )
        bar.update(chunk.shape[1])
    bar.close()
    return torch.cat(losses, dim=1), memory


@torch.no_grad()
def score(
    model: nn.Module,
    context_ids: Tensor | Iterable[int],
    target_ids: Tensor | Iterable[int],
    memory=None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Per-token losses (nats) of `target_ids` read right after `context_ids`.

    context_ids (C,) or (B, C) with C >= 1 (the last context token predicts the first target);
    target_ids (n,) or (B, n). Returns (B, n) float32 losses. The context is ingested at
    constant memory, then only the targets' logits are computed, chunk by chunk.
    """
    device = _device(model)
    context = _as_batch(context_ids, device, "context_ids")
    targets = _as_batch(target_ids, device, "target_ids")
    if context.shape[1] < 1:
        raise ValueError("score needs at least one context token to predict the first target")
    if context.shape[0] != targets.shape[0]:
        raise ValueError(
            f"context batch {context.shape[0]} does not match target batch {targets.shape[0]}"
        )
    memory = ingest(model, context[:, :-1], memory, chunk_size, progress)
    stream = torch.cat([context[:, -1:], targets], dim=1)
    losses, _ = stream_losses(model, stream, memory, chunk_size, progress)
    return losses


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_ids: Tensor | Iterable[int],
    max_new_tokens: int,
    memory=None,
    stop_ids: Iterable[int] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Greedy decoding with `model.step` (key/value cache inside the fold).

    prompt_ids (P,) or (B, P) with P >= 1 continue the stream in `memory` (e.g. a long context
    from `ingest`). Returns the generated ids (B, n), n <= max_new_tokens: decoding stops once
    every row has produced one of `stop_ids`; a row that stopped keeps its stop id and is
    padded with it afterwards.
    """
    prompt = _as_batch(prompt_ids, _device(model), "prompt_ids")
    if prompt.shape[1] < 1:
        raise ValueError("greedy_generate needs a prompt of at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=prompt.device)
    memory = ingest(model, prompt[:, :-1], memory, chunk_size)
    token = prompt[:, -1]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    generated = []
    for _ in range(max_new_tokens):
        out = model.step(token, memory)
        memory = out.memory
        next_token = out.logits.argmax(dim=-1)
        if generated:  # rows that already stopped repeat their stop id
            next_token = torch.where(done, generated[-1], next_token)
        generated.append(next_token)
        if stops.numel():
            done |= torch.isin(next_token, stops)
            if bool(done.all()):
                break
        token = next_token
    return torch.stack(generated, dim=1)


__all__ = ["default_chunk_size", "greedy_generate", "ingest", "score", "stream_losses"]
