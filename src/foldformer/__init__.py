"""foldformer: folded context condensation transformers (arXiv 2405.04620)."""

from foldformer.config import ConfigError, FoldedConfig
from foldformer.hf_fold import fold, wrap_rmt
from foldformer.model import FoldedOutput, FoldedTransformer, FoldState

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FoldState",
    "FoldedConfig",
    "FoldedOutput",
    "FoldedTransformer",
    "__version__",
    "fold",
    "wrap_rmt",
]
