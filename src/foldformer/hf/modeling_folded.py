"""`FoldedForCausalLM`: the folded transformer behind `transformers.PreTrainedModel` and
`GenerationMixin`, with its fold state as a `transformers.Cache` (`FoldCache`).

The weights are a `foldformer.model.FoldedTransformer`'s (``self.model``), saved under its own
parameter names, so a foldformer checkpoint loads here and a folder saved here loads in
foldformer. `generate()` reads the prompt fold by fold (no logits for positions it does not
need) and then one token per step, so its memory does not grow with the prompt or the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from foldformer.generate import ingest
from foldformer.hf.configuration_folded import FoldedHFConfig
from foldformer.model import FoldedTransformer, FoldState


class FoldCache(Cache):
    """The fold state of a batch of streams (a `foldformer.model.FoldState`), as `generate()`
    carries caches.

    It holds no per-layer key/value list: ``state`` is the memory of m final-layer states and
    the keys/values of the current fold only (at most m + w positions), whatever was read.
    Like a recurrent state it cannot be cropped; ``seen_tokens`` counts the tokens read.
    """

    def __init__(self, state: FoldState | None = None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.state, self.seen_tokens = state, seen_tokens

    def __repr__(self) -> str:
        return f"FoldCache(seen_tokens={self.seen_tokens})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a FoldCache cannot be cropped: the folds it condensed are gone")

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index(indices)

    def reorder_cache(self, beam_idx: Tensor) -> None:  # beam search
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch_size, device=self.state.memory.device)
            self.state = self.state.index(rows.repeat_interleave(repeats))


class FoldedForCausalLM(PreTrainedModel, GenerationMixin):
    """A `FoldedTransformer` with the Hugging Face model API.

    forward(input_ids, cache=None, labels=None, logits_to_keep=0): labels follow transformers'
    convention (``labels=input_ids``; the shift is done here; -100 is ignored); ``cache`` is
    the `FoldCache` of the previous call, so chunk after chunk continues one stream.
    """

    config_class = FoldedHFConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _is_stateful = True  # no assisted decoding: a fold cannot be rolled back

    def __init__(self, config: FoldedHFConfig):
        super().__init__(config)
        self.model = FoldedTransformer(config.to_folded_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: FoldedTransformer initialises itself (GPT-2 style, fold_in near identity)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a FoldCache, made by forward

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value) -> None:
        self.model.head = value

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """transformers' save_pretrained (and so push_to_hub) under FoldedTransformer's names."""
        if "state_dict" not in kwargs:
            state = self.model.state_dict()
            if self.config.tie_embeddings:  # one tensor, saved once, as foldformer saves it
                del state["head.weight"]
            kwargs["state_dict"] = state
        super().save_pretrained(save_directory, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        cache: FoldCache | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,  # position_ids and the like: the fold sets its own positions
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("FoldedForCausalLM reads input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "FoldedForCausalLM reads every token of a stream: attention_mask must be all "
                "ones (no padding); give rows of equal length"
            )
        if cache is not None and not isinstance(cache, FoldCache):
            raise TypeError(f"cache must be a FoldCache, got {type(cache).__name__}")
        if isinstance(logits_to_keep, Tensor):
            raise ValueError("logits_to_keep must be an int for FoldedForCausalLM")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = None if cache is None else cache.state
        seen = 0 if cache is None else cache.seen_tokens
        if (
            labels is None
            and not torch.is_grad_enabled()
            and 0 < logits_to_keep < input_ids.shape[1]
        ):
            # Positions without wanted logits are read chunk by chunk at constant memory (the
            # prefill of generate(), as foldformer.generate.greedy_generate reads a prompt).
            state = ingest(self.model, input_ids[:, :-logits_to_keep], state)
            out = self.model(input_ids[:, -logits_to_keep:], memory=state)
        else:
            targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
            out = self.model(input_ids, memory=state, labels=targets, logits_to_keep=logits_to_keep)
        new_cache = None
        if use_cache:
            new_cache = cache if cache is not None else FoldCache()
            new_cache.state, new_cache.seen_tokens = out.memory, seen + input_ids.shape[1]
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, cache=new_cache)
