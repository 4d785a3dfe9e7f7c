"""The folded model's configuration as a `transformers.PretrainedConfig` (model_type "folded").

Its fields are `foldformer.config.FoldedConfig`'s, under the same names and checked by it, so the
config.json of a foldformer checkpoint and of `FoldedForCausalLM.save_pretrained` are read alike.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from foldformer.config import FoldedConfig

FIELDS = tuple(f.name for f in dataclasses.fields(FoldedConfig))


class FoldedHFConfig(PretrainedConfig):
    """A `FoldedConfig` (plain or gated fold) for the Hugging Face Auto classes."""

    model_type = "folded"
    # transformers' standard names for the same fields
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, use_cache: bool = True, **kwargs):
        # FoldedConfig checks every value (one ConfigError naming it) and fills the defaults.
        folded = FoldedConfig.from_dict({k: kwargs.pop(k) for k in FIELDS if k in kwargs})
        for name in FIELDS:
            setattr(self, name, getattr(folded, name))
        self.use_cache = use_cache
        super().__init__(**kwargs)

    def to_folded_config(self) -> FoldedConfig:
        return FoldedConfig.from_dict({name: getattr(self, name) for name in FIELDS})
