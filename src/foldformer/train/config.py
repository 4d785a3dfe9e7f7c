"""What a run is: the model fields, how to train, what to train on.

A run is read in one order: a preset, then a TOML/JSON file, then `--key value` overrides; every
value is parsed by its field's type (foldformer.overrides) and checked when the dataclass is
built, so a bad value stops the run before any work with a line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from foldformer.config import ConfigError, JsonConfig
from foldformer.overrides import apply_overrides, read_config_file, typed
from foldformer.presets import PRESETS

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig(JsonConfig):
    """How to train. Every field can be overridden on the command line by its name."""

    batch_size: int = 16  # stream rows per device (split into grad_accum micro-batches)
    seq_len: int = 256  # tokens per row per step; a multiple of segment_len
    grad_accum: int = 1  # micro-batches per step
    max_steps: int = 1000  # optimizer steps (the cosine schedule ends here)
    max_minutes: float = 0.0  # >0: stop (and save) once this much wall time has passed
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (in [0, 1])
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decay of the matrices
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # 0 disables clipping
    bptt: int = 0  # detach the memory every bptt folds inside a step (0: whole step)
    checkpoint_folds: bool = False  # activation checkpointing per fold
    compile: bool = False  # torch.compile the model
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    eval_every: int = 200  # steps between validations; 0 disables periodic validation
    eval_batches: int = 8  # validation batches
    save_every: int = 500  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 keeps every one
    log_every: int = 10  # steps between metrics.jsonl records
    seed: int = 0  # weights, data order and dropout
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    # False: a block's parameters stay gathered from its first fold until the step is done,
    # instead of being re-gathered for every fold (more memory, fewer all-gathers)
    fsdp_reshard_after_forward: bool = True
    memory_fraction: float = 0.0  # >0: cap CUDA memory per process (e.g. the note's 24 GB)
    progress: bool = True  # a progress bar
    # A new run from a model folder's weights, model config and tokenizer (RUN, RUN/final, a
    # step_N checkpoint, a save_pretrained folder): docs/huggingface.md
    init_from: str = ""  # a model folder to fine-tune (fresh optimizer, new data)

    LATER_FIELDS = ("fsdp_reshard_after_forward", "init_from")

    def __post_init__(self) -> None:
        _parse_fields(self, "train")
        positive = ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_batches", "log_every")
        at_least_zero = ("warmup_steps", "bptt", "eval_every", "save_every", "keep_checkpoints")
        for name in positive + at_least_zero:
            value, low = getattr(self, name), 1 if name in positive else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a positive integer" if low else "an integer >= 0"
                raise ConfigError(f"{name} must be {kind}, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        ranges = {
            "min_lr_ratio": (0, 1),
            "memory_fraction": (0, 1),
            "weight_decay": (0, float("inf")),
            "grad_clip": (0, float("inf")),
            "max_minutes": (0, float("inf")),
        }
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):  # AdamW's averages need a factor below 1
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_device_name(self.device)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_name(name: str) -> None:
    """`auto` or a device torch knows by that name (cpu, cuda, cuda:1, mps); whether it exists
    on this machine is checked when the run starts (foldformer.train.parallel)."""
    if name == "auto":
        return
    try:
        known = torch.device(name).type in DEVICE_TYPES
    except (RuntimeError, ValueError):
        known = False
    if not known:
        raise ConfigError(f"device={name!r} is not a device: auto, cpu, cuda, cuda:N or mps")


@dataclass
class DataConfig(JsonConfig):
    """What to train on: data specs (see docs/data.md) and the tokenizer."""

    train: list[str] = field(default_factory=list)  # training data specs
    val: list[str] = field(default_factory=list)  # validation data specs
    tokenizer: str = "bytes"  # "bytes", a tokenizer.json, or a directory holding one
    cache_dir: str = ""  # token cache; default ~/.cache/foldformer

    def __post_init__(self) -> None:
        _parse_fields(self, "data")


def _parse_fields(config, section: str) -> None:
    """Each field by its type, however the dataclass was built (file, command line, Python)."""
    for name, value in typed(type(config), vars(config), section).items():
        setattr(config, name, value)


def model_config_class(model_type: str) -> type:
    from foldformer.models import _classes

    try:
        return _classes(model_type)[1]
    except ValueError as error:  # an unknown model_type
        raise ConfigError(str(error)) from None


@dataclass
class RunConfig:
    """A whole run: model fields (with model_type), training and data. `resumes` records each
    resume that changed the configuration (with --allow-config-change): what changed, when."""

    model: dict[str, Any]
    train: TrainConfig
    data: DataConfig
    resumes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        values = {
            "model": dict(self.model),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
        }
        if self.resumes:
            values["resumes"] = list(self.resumes)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - {"model", "train", "data", "resumes"})
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections: model, train, data")
        model = dict(values.get("model", {}))
        model = typed(model_config_class(model.get("model_type", "folded")), model, "model")
        return cls(
            model=model,
            train=TrainConfig.from_dict(values.get("train", {})),
            data=DataConfig.from_dict(values.get("data", {})),
            resumes=list(values.get("resumes", [])),
        )


def run_sections(model_type: str) -> dict[str, type]:
    """The dataclass of each section, for overrides and `train --help`."""
    return {"model": model_config_class(model_type), "train": TrainConfig, "data": DataConfig}


def load_run_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset, then TOML/JSON file, then overrides (`name` or `section.name`: a string parsed
    by the field's type, or a value of that type)."""
    values: dict[str, Any] = {"model": {"model_type": "folded"}, "train": {}, "data": {}}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        for section, fields in PRESETS[preset].items():
            values[section].update(fields)
    if path is not None:
        for section, fields in read_config_file(path).items():
            if section not in values:
                raise ConfigError(f"unknown config section [{section}] in {path}")
            values[section].update(fields)
    overrides = dict(overrides or {})
    for key in ("model_type", "model.model_type"):  # first: it decides the model's fields
        if key in overrides:
            values["model"]["model_type"] = str(overrides.pop(key))
    apply_overrides(values, overrides, run_sections(values["model"]["model_type"]))
    return RunConfig.from_dict(values)
