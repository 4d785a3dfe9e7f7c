"""foldformer: folded context condensation transformers (arXiv 2405.04620)."""

from foldformer.config import ConfigError, FoldedConfig

# foldformer.hf registers model_type "folded" with transformers' AutoConfig/AutoModelForCausalLM.
from foldformer.hf import FoldCache, FoldedForCausalLM, FoldedHFConfig
from foldformer.hf_fold import fold, wrap_rmt
from foldformer.model import FoldedOutput, FoldedTransformer, FoldState

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FoldCache",
    "FoldState",
    "FoldedConfig",
    "FoldedForCausalLM",
    "FoldedHFConfig",
    "FoldedOutput",
    "FoldedTransformer",
    "__version__",
    "fold",
    "wrap_rmt",
]
