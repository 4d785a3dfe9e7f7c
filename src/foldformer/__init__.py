"""foldformer: folded context condensation transformers (arXiv 2405.04620)."""

from foldformer.config import ConfigError, FoldedConfig
from foldformer.model import FoldedOutput, FoldedTransformer, FoldState

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FoldState",
    "FoldedConfig",
    "FoldedOutput",
    "FoldedTransformer",
    "__version__",
]
