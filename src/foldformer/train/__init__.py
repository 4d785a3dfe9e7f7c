"""Training: one loop for every model in the project, from one CPU to several GPUs.

    foldformer train [CONFIG.toml] [--preset NAME] [--data SPEC ...] [--out DIR]
                     [--max-steps N] [--resume DIR] [--key value ...]

The package, by concern: config (what a run is), trainer (the loop and its step), checkpoint
(save and resume), parallel (devices, DDP, FSDP), optim (AdamW and the schedule), metrics
(metrics.jsonl, TensorBoard, progress). Presets live in foldformer.presets.
"""

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
