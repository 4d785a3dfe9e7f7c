"""Model FLOPs and utilisation (MFU): the one convention of `foldformer bench memory`,
`foldformer compare` and benchmarks/ (DESIGN.md §6).

The FLOPs the algorithm must do per new token, for a model that reads folds of m + w positions
(w = min(segment_len, T), m = memory_len; full attention over T tokens: w = T, m = 0):

    dense      6·N·(m+w)/w training, 2·N·(m+w)/w inference   N = non-embedding parameters
    attention  12·L·d·(m+w)²/w training, 4·L·d·(m+w)²/w inference   (the causal half counted
               in full, as PaLM and nanoGPT count it)
    head       6·d·V training, 2·d·V inference

MFU = FLOPs per new token × new tokens/s / the bf16 matmul rate measured on the same device.
Recomputation (per-fold activation checkpointing) is not counted, and the head is counted for
every new token also where a reader keeps no logits (streaming ingestion), so one definition
serves training and inference. The same formula is applied to every model type from its own
L, d, V, w and m (for Transformer-XL, whose cached states are not re-evolved, it counts more
than the model does).
"""

from __future__ import annotations

import time

import torch
from torch import nn

CONVENTION = (
    "model FLOPs per new token = 6·N·(m+w)/w training, 2·N·(m+w)/w inference (N non-embedding "
    "parameters, w = min(w, T)), plus attention 12·L·d·(m+w)²/w training, 4·L·d·(m+w)²/w "
    "inference (causal half counted in full), plus the output head 6·d·V, 2·d·V; times new "
    "tokens/s, over the measured bf16 matmul rate; recomputation not counted "
    "(foldformer.evaluate.flops)"
)


def flops_per_token(config, n_params: int, training: bool, length: int | None = None) -> float:
    """Model FLOPs per new token under CONVENTION, from a config's shape (n_layers, d_model,
    vocab_size, segment_len, memory_len) and its non-embedding parameter count.

    length: tokens per row of the measured call; a fold is never longer than that.
    """
    w = int(config.segment_len) if length is None else min(int(config.segment_len), length)
    if w < 1:
        raise ValueError(f"FLOPs per token need a length >= 1, got {length}")
    fold = int(config.memory_len) + w
    factor = 6 if training else 2
    dense = factor * n_params * fold / w
    attention = 2 * factor * config.n_layers * config.d_model * fold * fold / w
    head = factor * config.d_model * config.vocab_size
    return dense + attention + head


def non_embedding_parameters(model: nn.Module) -> int:
    """N of the convention: every parameter but the token embedding (and an untied head)."""
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters(non_embedding=True))
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embeddings


def model_flops_per_token(model: nn.Module, training: bool, length: int | None = None) -> float:
    """flops_per_token for a built model (its config and its non-embedding parameters)."""
    return flops_per_token(model.config, non_embedding_parameters(model), training, length)


def matmul_rate(device: torch.device | str, size: int | None = None, repeats: int = 10) -> float:
    """Sustained dense bf16 matrix-multiply rate (FLOP/s): the denominator of MFU.

    size: the square matrices' side (default 8192 on CUDA, 512 elsewhere: a smoke test)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 512)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


__all__ = [
    "CONVENTION",
    "flops_per_token",
    "matmul_rate",
    "model_flops_per_token",
    "non_embedding_parameters",
]
