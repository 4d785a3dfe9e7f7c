"""Training: one loop for every model in the project, from one CPU to several GPUs.

    foldformer train [CONFIG.toml] [--preset NAME] [--data SPEC ...] [--out DIR]
                     [--max-steps N] [--resume DIR] [--key value ...]

The package, by concern: config (what a run is), trainer (the loop and its step), checkpoint
(save and resume), parallel (devices, DDP, FSDP), optim (AdamW and the schedule), metrics
(metrics.jsonl, TensorBoard, progress). Presets live in foldformer.presets.
"""

from foldformer.overrides import tomllib as _tomllib_module
from foldformer.presets import PRESET_DIR, PRESETS
from foldformer.train.checkpoint import (
    RESUME_FILES,
    checkpoint_dirs,
    find_resume_checkpoint,
    save_checkpoint,
)
from foldformer.train.config import DataConfig, RunConfig, TrainConfig, load_run_config
from foldformer.train.metrics import MetricLogger
from foldformer.train.optim import lr_factor, make_optimizer
from foldformer.train.parallel import setup_distributed, unwrap, wrap_distributed
from foldformer.train.trainer import Trainer, TrainingInterrupted, train, validate


def _tomllib():  # compare.py's loader reads its TOML through this (to move to foldformer.overrides)
    return _tomllib_module


def _parse_value(raw: str):
    """compare.py's untyped override value (to move to foldformer.overrides.apply_overrides)."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if "," in raw:
        return [part for part in raw.split(",") if part]
    return raw


__all__ = [
    "PRESETS",
    "PRESET_DIR",
    "RESUME_FILES",
    "DataConfig",
    "MetricLogger",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "checkpoint_dirs",
    "find_resume_checkpoint",
    "load_run_config",
    "lr_factor",
    "make_optimizer",
    "save_checkpoint",
    "setup_distributed",
    "train",
    "unwrap",
    "validate",
    "wrap_distributed",
]
