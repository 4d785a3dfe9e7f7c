"""AdamW and its schedule: linear warm-up, then cosine decay to lr * min_lr_ratio."""

from __future__ import annotations

import math

import torch
from torch import nn

from foldformer.train.config import TrainConfig


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, biases or the initial memory)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "initial_memory" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(
        1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    )
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def apply_hyperparameters(optimizer, scheduler, config: TrainConfig) -> None:
    """After loading a checkpoint's optimizer (which brings back its lr, betas and decay): the
    values of `config` instead, for a resume allowed to change them."""
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    factor = lr_factor(scheduler.last_epoch, config)
    for group, decay in zip(optimizer.param_groups, (config.weight_decay, 0.0), strict=True):
        group.update(lr=config.lr * factor, betas=(config.beta1, config.beta2), weight_decay=decay)
