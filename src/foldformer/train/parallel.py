"""One process or several under torchrun: the device, the process group, DDP or FSDP2."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from foldformer.train.config import check_device_name


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device `name` means here (foldformer.evaluate.common.resolve_device, with the
    config's wording); a device this machine lacks is a ConfigError naming it."""
    from foldformer.evaluate.common import resolve_device as resolve

    check_device_name(name)
    return resolve(name, "device=", local_rank, world_size)


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def wrap_distributed(
    model: nn.Module, sharded: bool, device: torch.device, reshard_after_forward: bool = True
) -> nn.Module:
    """FSDP2 (each block, then the whole model, sharded over the ranks) or DDP.

    Every fold runs every block, so FSDP2's default frees a block's gathered parameters after
    each fold's forward and gathers them again for the next; reshard_after_forward=False keeps
    them through the forward folds (backward still re-gathers per fold: also keeping them there,
    `set_reshard_after_backward(False)`, trained wrongly with gloo on torch 2.13 — the loss left
    the single-process curve at step 2)."""
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, reshard_after_forward=reshard_after_forward)
        fully_shard(model, reshard_after_forward=reshard_after_forward)
        return model
    # The initial memory gets a gradient only in steps where some row resets.
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def full_state_dict_options():
    """Whole tensors gathered to the CPU: FSDP2 models save and load in the unsharded format
    every other run uses."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def any_rank(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on one: every rank stops at the same step."""
    if world_size == 1:
        return flags
    values = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]
