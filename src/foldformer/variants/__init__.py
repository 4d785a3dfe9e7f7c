"""Baselines that are not a config of `foldformer.model` (DESIGN.md §5), and PyPI peer adapters.

In-house, from the shared blocks: ``sliding_window``, ``transformer_xl``, ``rmt``. No-memory and
full attention are FoldedConfig(memory_len=0) and FoldedConfig(memory_len=0, segment_len=10**9).
Peers (``pip install 'foldformer[peers]'``): ``peer_rmt``, ``peer_infini``, ``peer_xl``,
``peer_block_recurrent`` in `foldformer.variants.peers` (imported lazily: the packages are
optional). Every model is registered in ``foldformer.models.MODEL_TYPES`` and follows the
project protocol. `baseline_configs` and `match_parameters` (in `.baselines`) give the named
baselines of one size at matched parameter counts. See docs/baselines.md.
"""

from foldformer.variants.baselines import (
    BASELINES,
    baseline_configs,
    config_values,
    count_parameters,
    match_parameters,
)
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
    "BASELINES",
    "RMTConfig",
    "RMTState",
    "RecurrentMemoryTransformer",
    "SlidingWindowConfig",
    "SlidingWindowState",
    "SlidingWindowTransformer",
    "TransformerXL",
    "TransformerXLConfig",
    "TransformerXLState",
    "baseline_configs",
    "config_values",
    "count_parameters",
    "match_parameters",
]
