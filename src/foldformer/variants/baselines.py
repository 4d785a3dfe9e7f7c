"""The named baselines of DESIGN.md §5 for one model size, and parameter matching.

``baseline_configs`` turns one size (the fields of a folded model) into the config of every
named baseline; ``match_parameters`` then adjusts each one's d_ff (or d_model when d_ff alone
cannot) so its non-embedding parameter count is within ±10% of a target, as comparisons
require::

    configs = baseline_configs(dict(vocab_size=257, d_model=256, n_layers=4, n_heads=4,
                                    segment_len=64, memory_len=64))
    target = build_model("folded", strip(configs["folded"])).num_parameters()
    for name, values in configs.items():
        values, count = match_parameters(values["model_type"], values, target)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from foldformer.config import ConfigError
from foldformer.models import MODEL_TYPES, _classes, build_model

FULL_ATTENTION_SEGMENT = 10**9

# name -> (model_type, what it is); the order is the order of a comparison table.
BASELINES: dict[str, tuple[str, str]] = {
    "folded": ("folded", "folded context (ours), DESIGN.md §3"),
    "folded_gate": ("folded", "folded context with the optional memory gate (beyond the note)"),
    "no_memory": ("folded", "m = 0: independent segments of w tokens"),
    "full_attention": ("folded", "one causal attention over the whole sequence"),
    "sliding_window": ("sliding_window", "local attention, window w, no memory"),
    "transformer_xl": ("transformer_xl", "per-layer cache of the previous segment, stop-gradient"),
    "rmt": ("rmt", "memory tokens read at the start and written at the end of a segment"),
    "peer_rmt": ("peer_rmt", "recurrent-memory-transformer-pytorch"),
    "peer_infini": ("peer_infini", "infini-transformer-pytorch (Infini-attention)"),
    "peer_xl": ("peer_xl", "x-transformers with max_mem_len (XL recurrence)"),
    "peer_block_recurrent": ("peer_block_recurrent", "block-recurrent-transformer-pytorch"),
    "hf_folded": ("hf_folded", "a Hugging Face decoder folded (foldformer.fold)"),
    "hf_rmt": ("hf_rmt", "a Hugging Face decoder as an RMT (foldformer.wrap_rmt)"),
}
IN_HOUSE = ("folded", "no_memory", "full_attention", "sliding_window", "transformer_xl", "rmt")
PEER_NAMES = ("peer_rmt", "peer_infini", "peer_xl", "peer_block_recurrent")
# Built from a family and a shape (or a pretrained folder), HFBaselineConfig, rather than from
# the config they save (a Hugging Face config dict, which has no d_ff to match).
HF_TYPES = ("hf_folded", "hf_rmt")


def config_class(model_type: str) -> type:
    """The config a comparison gives a model type (its fields are [overrides.NAME]'s)."""
    if model_type in HF_TYPES:
        from foldformer.hf_fold import HFBaselineConfig  # hf_fold imports foldformer.variants

        return HFBaselineConfig
    return _classes(model_type)[1]


def model_values(model_type: str, values: dict[str, Any]) -> dict[str, Any]:
    """The config fields `build_model(model_type, ...)` takes for a baseline's values: a Hugging
    Face type's decoder config, the others' values as they are."""
    if model_type not in HF_TYPES:
        return values
    return config_class(model_type).from_dict(values).decoder_values(_classes(model_type)[1])


def config_values(values: dict[str, Any]) -> dict[str, Any]:
    """A baseline entry without its "model_type" key: the values its config class takes."""
    return {k: v for k, v in values.items() if k != "model_type"}


def _fit(model_type: str, values: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields the config class knows, validate, and return every field explicitly."""
    cls = config_class(model_type)
    known = {f.name for f in dataclasses.fields(cls)}
    config = cls.from_dict({k: v for k, v in values.items() if k in known})
    return {"model_type": model_type, **config.to_dict()}


def baseline_configs(
    base: dict[str, Any], names: list[str] | tuple[str, ...] | None = None
) -> dict[str, dict[str, Any]]:
    """Config dicts (with "model_type") of the named baselines at the size given by `base`.

    base: FoldedConfig fields (vocab_size, d_model, n_layers, n_heads, d_ff, segment_len w,
    memory_len m, ...). Each baseline keeps w and the shape; its memory is set as its design
    says: m for the folded model, Transformer-XL (cached states per layer), RMT and the peers
    with a memory size; 0 for no-memory, sliding window and Infini-attention (whose memory
    size is fixed by head_dim); full attention is one segment of 10**9 tokens. Fields a model
    does not have (e.g. fold_in for a baseline) are dropped. names: a subset of BASELINES
    (default: the in-house ones).
    """
    names = list(IN_HOUSE if names is None else names)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINES)}")
    base = dict(base)
    m = base.get("memory_len", 8)
    out = {}
    for name in names:
        model_type = BASELINES[name][0]
        values = dict(base)
        if name == "folded_gate":
            values["memory_gate"] = True
        elif name in ("no_memory", "sliding_window", "peer_infini"):
            values["memory_len"] = 0
        elif name == "full_attention":
            values.update(memory_len=0, segment_len=FULL_ATTENTION_SEGMENT)
        elif name in ("transformer_xl", "rmt", "hf_rmt", "peer_rmt", "peer_xl",
                      "peer_block_recurrent"):  # fmt: skip
            if m < 1 and name != "transformer_xl":
                raise ConfigError(f"baseline {name!r} needs memory_len >= 1, got {m}")
            values["memory_len"] = m
        out[name] = _fit(model_type, values)
    return out


def count_parameters(model_type: str, values: dict[str, Any]) -> int:
    """Non-embedding parameters of a model, built on the meta device (no memory used)."""
    values = model_values(model_type, config_values(values))
    values.pop("hf_model", None)  # a pretrained decoder's size is its config's: no weights read
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peers initialising empty tensors on meta
            model = build_model(model_type, values)
    except (RuntimeError, NotImplementedError):  # a peer or hf_* that cannot be built on meta
        model = build_model(model_type, values)
    return int(model.num_parameters(non_embedding=True))


def match_parameters(
    model_type: str,
    base_config_values: dict[str, Any],
    target_params: int,
    tolerance: float = 0.10,
) -> tuple[dict[str, Any], int]:
    """Adjust d_ff (and d_model when d_ff alone cannot) so the model's non-embedding
    parameter count is within ±tolerance of target_params.

    Returns the config values (every field explicit, without "model_type") and the count.
    d_model moves in steps of 2·n_heads so heads keep an even size; d_ff is kept a multiple of
    8 where that still lands within the tolerance.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    if target_params < 1:
        raise ValueError(f"target_params must be >= 1, got {target_params}")
    values = config_values(_fit(model_type, config_values(base_config_values)))
    low, high = target_params * (1 - tolerance), target_params * (1 + tolerance)

    def count(d_model: int, d_ff: int) -> int:
        return count_parameters(model_type, {**values, "d_model": d_model, "d_ff": d_ff})

    d_model = values["d_model"]
    if not count(d_model, 1) <= high or not count(d_model, 16 * d_model) >= low:
        d_model = _search_d_model(count, values["n_heads"], d_model, target_params)
    d_ff = _search_d_ff(lambda f: count(d_model, f), 16 * d_model, target_params)
    rounded = max(8, round(d_ff / 8) * 8)
    if low <= count(d_model, rounded) <= high:
        d_ff = rounded
    n = count(d_model, d_ff)
    if not low <= n <= high:
        raise ValueError(
            f"cannot bring {model_type} within ±{tolerance:.0%} of {target_params} parameters: "
            f"closest is {n} (d_model={d_model}, d_ff={d_ff}); change n_layers or n_heads"
        )
    return config_values(_fit(model_type, {**values, "d_model": d_model, "d_ff": d_ff})), n


def _search_d_ff(count, d_ff_max: int, target: int) -> int:
    """The d_ff in [1, d_ff_max] whose count is nearest the target (count grows with d_ff)."""
    lo, hi = 1, d_ff_max
    while lo < hi:  # smallest d_ff with count >= target
        mid = (lo + hi) // 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(count(lo - 1) - target) < abs(count(lo) - target):
        return lo - 1
    return lo


def _search_d_model(count, n_heads: int, d_model: int, target: int) -> int:
    """A d_model (multiple of 2·n_heads) whose count with d_ff = 4·d_model is nearest target."""
    step = 2 * n_heads
    lo, hi = 1, max(2, 2 * d_model // step)
    while count(hi * step, 4 * hi * step) < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid * step, 4 * mid * step) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo * step
