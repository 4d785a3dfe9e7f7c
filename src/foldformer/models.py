"""Every model the project trains, by the `model_type` written in its config.json.

All of them follow one protocol, so one training loop and one evaluation suite serve them::

    out = model(input_ids, memory=None, labels=None, reset_mask=None,
                bptt=0, checkpoint=False, logits_to_keep=0, return_logits=True)
    out.logits, out.loss, out.memory   # memory: pass back to continue the stream exactly
    model.config.segment_len, model.config.vocab_size
    model.save_pretrained(directory)   # config.json (with "model_type") + model.safetensors

The protocol is `foldformer.streaming.StreamingLM`: the segment driver owns the loop over
segments, each model one segment. Variants register themselves here with `register`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foldformer.config import FoldedConfig, read_model_config
from foldformer.model import FoldedTransformer

# model_type -> (module path, model class name, config class name)
MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "folded": ("foldformer.model", "FoldedTransformer", "FoldedConfig"),
    # baselines (DESIGN.md §5) and PyPI peers: foldformer.variants
    "sliding_window": (
        "foldformer.variants.sliding_window",
        "SlidingWindowTransformer",
        "SlidingWindowConfig",
    ),
    "transformer_xl": (
        "foldformer.variants.transformer_xl",
        "TransformerXL",
        "TransformerXLConfig",
    ),
    "rmt": ("foldformer.variants.rmt", "RecurrentMemoryTransformer", "RMTConfig"),
    "peer_rmt": ("foldformer.variants.peers", "PeerRMT", "PeerRMTConfig"),
    "peer_infini": ("foldformer.variants.peers", "PeerInfini", "PeerInfiniConfig"),
    "peer_xl": ("foldformer.variants.peers", "PeerXL", "PeerXLConfig"),
    "peer_block_recurrent": (
        "foldformer.variants.peers",
        "PeerBlockRecurrent",
        "PeerBlockRecurrentConfig",
    ),
    # a pretrained Hugging Face decoder, folded or as an RMT (foldformer.hf_fold)
    "hf_folded": ("foldformer.hf_fold", "FoldedHFDecoder", "HFDecoderConfig"),
    "hf_rmt": ("foldformer.hf_fold", "RMTHFDecoder", "HFRMTConfig"),
}


def register(model_type: str, module: str, model_class: str, config_class: str) -> None:
    MODEL_TYPES[model_type] = (module, model_class, config_class)


def _classes(model_type: str) -> tuple[type[nn.Module], Any]:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    module_name, model_name, config_name = MODEL_TYPES[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def build_model(model_type: str, config_values: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the given type from a dict of config fields."""
    model_class, config_class = _classes(model_type)
    return model_class(config_class.from_dict(config_values))


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load any model written by `save_pretrained`, dispatching on its model_type."""
    model_type, _ = read_model_config(directory)
    model_class, _ = _classes(model_type)
    return model_class.from_pretrained(directory, device=device)


__all__ = ["FoldedConfig", "FoldedTransformer", "build_model", "load_model", "register"]
