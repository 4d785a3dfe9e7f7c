"""Hugging Face integration: the folded model under the Auto classes.

Importing foldformer registers model_type "folded" with `transformers.AutoConfig` and
`AutoModelForCausalLM`, so a foldformer checkpoint or run folder loads as a transformers
model (docs/huggingface.md)::

    import foldformer  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("runs/x/final")
    tokenizer = AutoTokenizer.from_pretrained("runs/x/final")
    ids = tokenizer("The time machine", return_tensors="pt").input_ids
    print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))

The baselines (the other model types of foldformer.models) have no transformers class:
AutoConfig refuses their config.json with a ConfigError naming foldformer's own loader.
"""

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from foldformer.config import ConfigError
from foldformer.hf.configuration_folded import FoldedHFConfig
from foldformer.hf.modeling_folded import FoldCache, FoldedForCausalLM
from foldformer.models import MODEL_TYPES


class NoHFClassConfig(PretrainedConfig):
    """A foldformer model type without a transformers class: loading it is refused."""

    def __post_init__(self, **kwargs):  # transformers makes each subclass a dataclass
        raise ConfigError(
            f"model_type {self.model_type!r} has no transformers class (only 'folded' has): "
            "load it with foldformer.models.load_model"
        )


AutoConfig.register(FoldedHFConfig.model_type, FoldedHFConfig, exist_ok=True)
AutoModelForCausalLM.register(FoldedHFConfig, FoldedForCausalLM, exist_ok=True)
for _model_type in sorted(set(MODEL_TYPES) - {"folded"}):
    _refused = type(
        f"NoHFClassConfig_{_model_type}", (NoHFClassConfig,), {"model_type": _model_type}
    )
    AutoConfig.register(_model_type, _refused, exist_ok=True)

__all__ = ["FoldCache", "FoldedForCausalLM", "FoldedHFConfig"]
