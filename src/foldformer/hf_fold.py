"""Fold a pretrained Hugging Face decoder (GPT-2, Llama, Qwen2, Qwen3 families), DESIGN.md §3::

    from transformers import AutoModelForCausalLM
    import foldformer

    model = foldformer.fold(AutoModelForCausalLM.from_pretrained(path), memory_len=64,
                            segment_len=64)
    out = model(ids)                         # .logits, .memory
    out = model(more_ids, memory=out.memory) # the stream continues exactly
    model.save_pretrained("folded")          # foldformer.models.load_model("folded")

Each fold runs the decoder once over m + w input embeddings (``inputs_embeds``) at positions
0 … m+w−1, restarting every fold, under one causal mask: the m memory rows fold_in(M), then
the segment's token embeddings. M is the last m final-layer hidden states of the previous
fold, taken *after* the decoder's final norm (its ``last_hidden_state``, what the LM head
reads), because

- the normalised state is bounded whatever the depth, so the memory stays bounded over any
  number of folds with no norm of its own (invariant 3); the pre-norm residual stream grows;
- in a tied-embedding decoder it lives in the space the token embeddings do, so fold_in, a
  learned Linear d->d, starts as the identity scaled to the embeddings' RMS: a memory row
  enters as a token-sized "soft embedding" of what that position predicted.

With m = 0 the wrapped model is the unfolded decoder on each segment. `wrap_rmt` wraps the same
decoder as a Recurrent Memory Transformer instead (foldformer.variants.rmt: n memory tokens read
at the start and written at the end of a segment), the baseline it is compared with.
`HFBaselineConfig` is how `foldformer compare` builds either (models hf_folded, hf_rmt): a
fresh decoder of a family at a shape, or a pretrained folder (``init_from``).

Not supported: other families (refused by name), sliding-window attention layers, padding
masks (every row of a batch is a stream), and changing the decoder's vocabulary.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from foldformer.config import ConfigError, DecoderConfig, JsonConfig
from foldformer.model import FoldState
from foldformer.streaming import StreamingLM
from foldformer.variants.rmt import RecurrentMemoryTransformer, RMTState

# model_type of the Hugging Face config -> name of the base model's final norm
FAMILIES = {"gpt2": "ln_f", "llama": "norm", "qwen2": "norm", "qwen3": "norm"}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class HFDecoderConfig(JsonConfig):
    """A Hugging Face causal LM read in segments of ``segment_len`` tokens with a memory of
    ``memory_len`` states. ``hf_model`` names the decoder to start from (its weights load when
    the model is built, e.g. by `foldformer train --hf_model DIR`); a saved model keeps only
    ``hf_config``, its weights being in its own model.safetensors."""

    hf_model: str = ""  # a Hugging Face model folder (config.json + weights) to start from
    hf_config: dict[str, Any] = field(default_factory=dict)  # its config (read from hf_model)
    segment_len: int = 64  # w: tokens per fold
    memory_len: int = 64  # m: final-layer states folded back (RMT: memory tokens)
    vocab_size: int | None = None  # the decoder's; a smaller (the tokenizer's) one is accepted

    def __post_init__(self) -> None:
        if self.hf_model and not self.hf_config:
            self.hf_config = read_hf_config(self.hf_model)
        _check(bool(self.hf_config), "hf_model or hf_config must name the Hugging Face decoder")
        family = self.hf_config.get("model_type")
        _check(
            family in FAMILIES,
            f"hf_config model_type={family!r} is not supported; supported: {sorted(FAMILIES)}",
        )
        decoder = self.decoder_config()
        layer_types = getattr(decoder, "layer_types", None) or []
        _check(
            not getattr(decoder, "use_sliding_window", False)
            and "sliding_attention" not in layer_types,
            f"{family} decoder with sliding-window attention: not supported (one causal mask "
            "over the whole fold)",
        )
        for name in ("segment_len", "memory_len"):
            value, low = getattr(self, name), 1 if name == "segment_len" else 0
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{name} must be an integer >= {low}, got {value!r}",
            )
        limit = decoder.max_position_embeddings
        _check(
            self.positions <= limit,
            f"a fold spans {self.positions} positions ({self.spans}), more than the decoder's "
            f"max_position_embeddings={limit}",
        )
        given, self.vocab_size = self.vocab_size, decoder.vocab_size
        _check(
            given is None or given <= decoder.vocab_size,
            f"vocab_size={given} is larger than the decoder's vocab_size={decoder.vocab_size}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Without hf_model: a saved model's weights are its own, whatever folder they came from
        (which need not exist where it loads)."""
        values = super().to_dict()
        del values["hf_model"]
        return values

    def decoder_config(self):
        from transformers import AutoConfig

        return AutoConfig.for_model(**self.hf_config)

    @staticmethod
    def span(memory_len: int, segment_len: int) -> int:
        """Positions one fold attends over: m + w."""
        return memory_len + segment_len

    @property
    def positions(self) -> int:
        return self.span(self.memory_len, self.segment_len)

    spans: ClassVar[str] = "memory_len + segment_len"

    # the shape fields foldformer.evaluate.flops reads
    @property
    def d_model(self) -> int:
        return self.decoder_config().hidden_size

    @property
    def n_layers(self) -> int:
        return self.decoder_config().num_hidden_layers


@dataclass
class HFRMTConfig(HFDecoderConfig):
    """memory_len: memory tokens (n >= 1), read before the segment and written after it."""

    memory_len: int = 8

    spans: ClassVar[str] = "2 * memory_len + segment_len"

    def __post_init__(self) -> None:
        _check(
            isinstance(self.memory_len, int) and self.memory_len >= 1,
            f"memory_len must be >= 1 (RMT needs memory tokens), got {self.memory_len!r}",
        )
        super().__post_init__()

    @staticmethod
    def span(memory_len: int, segment_len: int) -> int:
        return 2 * memory_len + segment_len


def read_hf_config(folder: str, field: str = "hf_model") -> dict[str, Any]:
    """The config.json of a local Hugging Face model folder (nothing is downloaded); `field`
    names the setting that gave the folder, for the error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{field}={folder!r} is not a Hugging Face model folder: no config.json")
    return json.loads(path.read_text())


def family_config(
    family: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
    positions: int, dropout: float, tie_embeddings: bool,
) -> dict[str, Any]:  # fmt: skip
    """The config (as HFDecoderConfig.hf_config) of a fresh `family` decoder of this shape: one
    key/value head per head, head size d_model / n_heads, `positions` positions, no special
    tokens (the tokenizer's are the run's)."""
    from transformers import AutoConfig

    if family == "gpt2":
        shape = dict(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_ff,
                     n_positions=positions, resid_pdrop=dropout, embd_pdrop=dropout,
                     attn_pdrop=dropout)  # fmt: skip
    else:
        shape = dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                     num_key_value_heads=n_heads, head_dim=d_model // n_heads,
                     intermediate_size=d_ff, max_position_embeddings=positions,
                     attention_dropout=dropout)  # fmt: skip
    return AutoConfig.for_model(
        family, vocab_size=vocab_size, tie_word_embeddings=tie_embeddings, bos_token_id=None,
        eos_token_id=None, **shape,
    ).to_dict()  # fmt: skip


def decoder_shape(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The project's shape fields of a Hugging Face decoder config (GPT-2's n_inner=None is
    4 * d_model)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**hf_config)
    d_ff = getattr(config, "intermediate_size", None) or config.n_inner or 4 * config.hidden_size
    return dict(d_model=config.hidden_size, n_layers=config.num_hidden_layers,
                n_heads=config.num_attention_heads, d_ff=d_ff,
                tie_embeddings=bool(config.tie_word_embeddings))  # fmt: skip


@dataclass
class HFBaselineConfig(DecoderConfig):
    """A Hugging Face decoder as `foldformer compare` builds it for hf_folded and hf_rmt: a
    freshly initialised `family` decoder of this shape (by default the folded model's), or,
    with ``init_from``, the pretrained decoder of that folder (its family, shape and weights)
    to fine-tune."""

    family: str = "llama"  # gpt2, llama, qwen2, qwen3
    init_from: str = ""  # a Hugging Face model folder (config.json + weights)
    tie_embeddings: bool = True

    # what a pretrained decoder brings itself: an override may not set them next to init_from
    PRETRAINED: ClassVar[tuple[str, ...]] = (
        "family", "d_model", "n_layers", "n_heads", "d_ff", "tie_embeddings", "dropout",
    )  # fmt: skip

    def __post_init__(self) -> None:
        hf_config = read_hf_config(self.init_from, "init_from") if self.init_from else None
        if hf_config is not None:
            self.family = hf_config.get("model_type")
        source = f" (the decoder of init_from={self.init_from!r})" if self.init_from else ""
        _check(
            self.family in FAMILIES,
            f"family={self.family!r}{source} is not supported; supported: {sorted(FAMILIES)}",
        )
        if hf_config is not None:
            for name, value in decoder_shape(hf_config).items():
                setattr(self, name, value)
        super().__post_init__()

    def decoder_values(self, config_class: type[HFDecoderConfig]) -> dict[str, Any]:
        """The fields of config_class (HFDecoderConfig or HFRMTConfig) for this decoder."""
        values = dict(segment_len=self.segment_len, memory_len=self.memory_len,
                      vocab_size=self.vocab_size)  # fmt: skip
        if self.init_from:
            hf_config = read_hf_config(self.init_from, "init_from")
            return {"hf_model": self.init_from, "hf_config": hf_config, **values}
        hf_config = family_config(
            self.family, self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.d_ff,
            config_class.span(self.memory_len, self.segment_len), self.dropout,
            self.tie_embeddings,
        )  # fmt: skip
        return {"hf_config": hf_config, **values}


# ---------------------------------------------------------------------------------------------
# What both wrappings share: the decoder run over input embeddings, its cache as tensors
# ---------------------------------------------------------------------------------------------


class HFStreamingLM(StreamingLM):
    """A Hugging Face causal LM (``self.decoder``) behind the project's streaming protocol.
    Subclasses say what enters before a segment and what is kept after it."""

    config_class: ClassVar[type] = HFDecoderConfig

    def __init__(self, config: HFDecoderConfig, decoder: nn.Module | None = None):
        from transformers import AutoModelForCausalLM

        super().__init__(config)
        if decoder is None and config.hf_model:
            decoder = AutoModelForCausalLM.from_pretrained(
                config.hf_model, dtype=torch.float32, local_files_only=True
            )
        elif decoder is None:  # weights follow (from_pretrained) or start fresh
            decoder = AutoModelForCausalLM.from_config(config.decoder_config(), dtype=torch.float32)
        self.decoder = decoder
        self.d_model = decoder.config.hidden_size
        # transformers renamed past_key_values to cache (5.2x); read once, not inside a trace
        names = inspect.signature(decoder.base_model.forward).parameters
        self._cache_argument = "cache" if "cache" in names else "past_key_values"

    def run_blocks(
        self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, use_cache: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The decoder over input embeddings x (B, N, d) at positions P … P+N−1 (P = cached
        length): final-layer states after the final norm (B, N, d) and, with use_cache, the
        stacked keys/values (L, B, kv_heads, P+N, head_dim), as foldformer.layers.run_stack."""
        from transformers import DynamicCache

        P = 0 if cache is None else cache[0].shape[3]
        positions = torch.arange(P, P + x.shape[1], device=x.device).expand(x.shape[0], -1)
        hf_cache = None
        if use_cache:
            hf_cache = DynamicCache(None if cache is None else list(zip(*cache, strict=True)))
        # transformers renamed past_key_values to cache (5.2x); the cache object is filled in
        # place under either name, so it is read back from there.
        out = self.decoder.base_model(
            inputs_embeds=x, position_ids=positions, use_cache=use_cache,
            **{self._cache_argument: hf_cache},
        )  # fmt: skip
        if not use_cache:
            return out.last_hidden_state, None, None
        keys = torch.stack([layer.keys for layer in hf_cache.layers])
        values = torch.stack([layer.values for layer in hf_cache.layers])
        return out.last_hidden_state, keys, values

    @property
    def embed(self) -> nn.Embedding:
        return self.decoder.get_input_embeddings()

    def inputs(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.get_output_embeddings()(hidden)  # hidden: after the final norm

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Token embeddings, an untied head and GPT-2's learned positions (`wpe`; the other
        families are rotary), left out of non-embedding counts as for every model."""
        head = self.decoder.get_output_embeddings().weight
        params = [self.embed.weight] + ([] if head is self.embed.weight else [head])
        positions = getattr(self.decoder.base_model, "wpe", None)
        return params + ([] if positions is None else [positions.weight])

    def embedding_rms(self) -> float:
        return self.embed.weight.detach().float().pow(2).mean().sqrt().item()


# ---------------------------------------------------------------------------------------------
# The fold
# ---------------------------------------------------------------------------------------------


class FoldedHFDecoder(HFStreamingLM):
    """A Hugging Face decoder folded (DESIGN.md §3): the last m final-layer states of a fold
    re-enter through fold_in before the next segment."""

    model_type: ClassVar[str] = "hf_folded"
    state_class: ClassVar[type] = FoldState

    def __init__(self, config: HFDecoderConfig, decoder: nn.Module | None = None):
        super().__init__(config, decoder)
        self.fold_in = nn.Linear(self.d_model, self.d_model, bias=False)
        # the identity, scaled so a memory row has a token embedding's RMS (module docstring)
        final_norm = getattr(self.decoder.base_model, FAMILIES[config.hf_config["model_type"]])
        norm_rms = final_norm.weight.detach().float().pow(2).mean().sqrt().item()
        with torch.no_grad():
            self.fold_in.weight.copy_(torch.eye(self.d_model) * self.embedding_rms() / norm_rms)
        # M0 = 0: a fresh stream's memory rows enter as zero embeddings (plus GPT-2's positions)
        self.initial_memory = nn.Parameter(torch.zeros(config.memory_len, self.d_model))
        self.to(self.embed.weight.dtype)

    def initial_state(self, batch_size: int) -> FoldState:
        return FoldState(memory=self.initial_memory.unsqueeze(0).expand(batch_size, -1, -1))

    def with_memory(self, memory: Tensor, segment: Tensor) -> Tensor:
        return torch.cat([self.fold_in(memory.to(segment.dtype)), segment], dim=1)

    def complete_fold(self, memory: Tensor, segment: Tensor) -> Tensor:
        """A whole fold in one pass, no cache: final states of the m + w positions."""
        return self.run_blocks(self.with_memory(memory, segment), use_cache=False)[0]

    def whole_segment(self, state: FoldState, segment: Tensor, context) -> tuple[Tensor, Any]:
        top = self.fold_step(state.memory, segment)  # compiled by compile_fold
        return top[:, self.config.memory_len :], self.condense(FoldState(state.memory, top=top))

    def partial_segment(self, state: FoldState, segment: Tensor, context) -> tuple[Tensor, Any]:
        if state.top is None:  # the fold starts here: memory rows go first
            top, keys, values = self.run_blocks(self.with_memory(state.memory, segment))
            new_top = top[:, self.config.memory_len :]
        else:
            new_top, keys, values = self.run_blocks(segment, (state.keys, state.values))
            top = torch.cat([state.top, new_top], dim=1)
        return new_top, FoldState(state.memory, keys, values, top)

    def condense(self, state: FoldState) -> FoldState:
        """The next memory: the fold's last m final-layer states."""
        return FoldState(memory=state.top[:, state.top.shape[1] - self.config.memory_len :])


# ---------------------------------------------------------------------------------------------
# The RMT baseline: foldformer.variants.rmt's segment steps on the decoder's blocks
# ---------------------------------------------------------------------------------------------


class RMTHFDecoder(HFStreamingLM):
    """A Hugging Face decoder as a Recurrent Memory Transformer: the stack runs over
    [M, S_k, M] and the write positions' final states (after the final norm) are the next M.
    The segment steps are the in-house RMT's, run on this decoder's `run_blocks`."""

    model_type: ClassVar[str] = "hf_rmt"
    config_class: ClassVar[type] = HFRMTConfig
    state_class: ClassVar[type] = RMTState

    def __init__(self, config: HFRMTConfig, decoder: nn.Module | None = None):
        super().__init__(config, decoder)
        # M0 like a token embedding; the decoder's output is normalised already (norm_out)
        std = self.embedding_rms()
        self.initial_memory = nn.Parameter(torch.randn(config.memory_len, self.d_model) * std)
        self.norm_out = nn.Identity()
        self.to(self.embed.weight.dtype)

    def complete_fold(self, memory: Tensor, segment: Tensor) -> Tensor:
        """[read M, segment, write M] in one pass, no cache (RMT's, on this decoder)."""
        return self.run_blocks(torch.cat([memory, segment, memory], dim=1), use_cache=False)[0]

    initial_state = RecurrentMemoryTransformer.initial_state
    whole_segment = RecurrentMemoryTransformer.whole_segment
    partial_segment = RecurrentMemoryTransformer.partial_segment
    condense = RecurrentMemoryTransformer.condense


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _wrap(cls, hf_model: nn.Module, memory_len: int, segment_len: int) -> HFStreamingLM:
    config_values = getattr(hf_model, "config", None)
    if config_values is None or not hasattr(config_values, "to_dict"):
        raise TypeError(
            f"fold() takes a Hugging Face causal LM (a PreTrainedModel), got "
            f"{type(hf_model).__name__}"
        )
    config = cls.config_class(
        hf_config=config_values.to_dict(), memory_len=memory_len, segment_len=segment_len
    )
    return cls(config, decoder=hf_model)


def fold(hf_model: nn.Module, memory_len: int, segment_len: int) -> FoldedHFDecoder:
    """`hf_model` (its weights shared, not copied) folded with memory m and segments of w
    tokens: a model of the project's streaming protocol (foldformer.streaming)."""
    return _wrap(FoldedHFDecoder, hf_model, memory_len, segment_len)


def wrap_rmt(hf_model: nn.Module, memory_len: int, segment_len: int) -> RMTHFDecoder:
    """`hf_model` as an RMT with `memory_len` memory tokens and segments of w tokens."""
    return _wrap(RMTHFDecoder, hf_model, memory_len, segment_len)


__all__ = [
    "FoldedHFDecoder",
    "HFBaselineConfig",
    "HFDecoderConfig",
    "HFRMTConfig",
    "RMTHFDecoder",
    "fold",
    "wrap_rmt",
]
