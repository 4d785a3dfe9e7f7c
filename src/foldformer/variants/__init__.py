"""Baselines that are not a config of `foldformer.model` (DESIGN.md §5), and PyPI peer adapters.

In-house, from the shared blocks: ``sliding_window``, ``transformer_xl``, ``rmt``. No-memory and
full attention are FoldedConfig(memory_len=0) and FoldedConfig(memory_len=0, segment_len=10**9).
Every model is registered in ``foldformer.models.MODEL_TYPES`` and follows the project protocol.
"""

from foldformer.variants.rmt import RecurrentMemoryTransformer, RMTConfig, RMTState
from foldformer.variants.sliding_window import (
    SlidingWindowConfig,
    SlidingWindowState,
    SlidingWindowTransformer,
)
from foldformer.variants.transformer_xl import (
    TransformerXL,
    TransformerXLConfig,
    TransformerXLState,
)

__all__ = [
    "RMTConfig",
    "RMTState",
    "RecurrentMemoryTransformer",
    "SlidingWindowConfig",
    "SlidingWindowState",
    "SlidingWindowTransformer",
    "TransformerXL",
    "TransformerXLConfig",
    "TransformerXLState",
]
