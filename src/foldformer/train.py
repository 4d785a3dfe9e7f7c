"""One training loop for every model in the project, from one CPU to several GPUs.

    foldformer train [CONFIG.toml] [--preset NAME] [--data SPEC ...] [--out DIR]
                     [--max-steps N] [--resume DIR] [--key value ...]

Each batch row is a continuous stream: the model's memory for that row is carried from one
step to the next (detached at the batch edge, as Transformer-XL carries its cache) and reset
at document boundaries. Under `torchrun --nproc_per_node N` the same command trains with DDP
(NCCL on GPUs, gloo on CPUs), each rank reading its own share of the streams.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from foldformer.config import ConfigError, JsonConfig
from foldformer.models import build_model

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(JsonConfig):
    """How to train. Every field can be overridden on the command line by its name."""

    batch_size: int = 16  # stream rows per device (split into grad_accum micro-batches)
    seq_len: int = 256  # tokens per row per step; a multiple of segment_len
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float = 0.0  # >0: stop (and save) once this much wall time has passed
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    bptt: int = 0  # detach the memory every bptt folds inside a step (0: whole step)
    checkpoint_folds: bool = False  # activation checkpointing per fold
    compile: bool = False  # torch.compile the model
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    eval_every: int = 200  # 0 disables periodic validation
    eval_batches: int = 8
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    memory_fraction: float = 0.0  # >0: cap CUDA memory per process (e.g. the note's 24 GB)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_batches")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r} is not one of auto, fp32, bf16")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in [0, 1], got {self.memory_fraction!r}")


@dataclass
class DataConfig(JsonConfig):
    """What to train on: data specs (see docs/data.md) and the tokenizer."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    tokenizer: str = "bytes"  # "bytes", a tokenizer.json, or a directory holding one
    cache_dir: str = ""  # token cache; default ~/.cache/foldformer


@dataclass
class RunConfig:
    """A whole run: model fields (with model_type), training and data."""

    model: dict[str, Any]
    train: TrainConfig
    data: DataConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - {"model", "train", "data"})
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections: model, train, data")
        return cls(
            model=dict(values.get("model", {})),
            train=TrainConfig.from_dict(values.get("train", {})),
            data=DataConfig.from_dict(values.get("data", {})),
        )


PRESET_DIR = Path(__file__).resolve().parent / "presets"

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, minutes: byte-level, w = m = 8, gated memory (the demo's model).
    "tiny": {
        "model": dict(model_type="folded", d_model=64, n_layers=2, n_heads=4,
                      segment_len=8, memory_len=8, memory_gate=True),
        "train": dict(batch_size=32, seq_len=128, lr=1e-3, warmup_steps=20, max_steps=1000,
                      eval_every=100, eval_batches=4, save_every=200),
    },
    # The note's set-up: w = m = 12, a small GPT, byte-level (as the reference runs;
    # presets/seed_bpe8192.json is a BPE trained on the pg training authors, for --tokenizer).
    # 64 folds of backpropagation a step over 1024 rows (a 24-position fold costs the same
    # time from 256 to 1024 rows); 360 steps = 283M bytes, 2.4 epochs of the pg training
    # authors, about 6 minutes on an H200: held-out ECL 192 bytes, with --memory_gate true at
    # least 6144 (docs/results.md, round 4).
    "seed": {
        "model": dict(model_type="folded", d_model=384, n_layers=6, n_heads=6,
                      segment_len=12, memory_len=12),
        "train": dict(batch_size=1024, seq_len=768, lr=1e-3, warmup_steps=30, max_steps=360,
                      checkpoint_folds=True, compile=True, eval_every=90, save_every=90),
        "data": dict(tokenizer="bytes"),
    },
    # GPU throughput: GPT-2-small shape, w = m = 512.
    "base": {
        "model": dict(model_type="folded", d_model=768, n_layers=12, n_heads=12,
                      segment_len=512, memory_len=512, activation="gelu"),
        "train": dict(batch_size=32, seq_len=2048, lr=6e-4, warmup_steps=500, max_steps=20000,
                      checkpoint_folds=True, eval_every=1000, save_every=2000),
    },
}  # fmt: skip


def load_run_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, str] | None = None,
) -> RunConfig:
    """Preset, then TOML/JSON file, then `key=value` overrides (by field name)."""
    values: dict[str, Any] = {"model": {"model_type": "folded"}, "train": {}, "data": {}}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        for section, fields in PRESETS[preset].items():
            values[section].update(fields)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        if path.suffix == ".json":
            loaded = json.loads(path.read_text())
        else:
            loaded = _tomllib().loads(path.read_text())
        for section, fields in loaded.items():
            if section not in values:
                raise ConfigError(f"unknown config section [{section}] in {path}")
            values[section].update(fields)
    for key, raw in (overrides or {}).items():
        section, name = _find_field(key, values["model"].get("model_type", "folded"))
        values[section][name] = _parse_value(raw)
    return RunConfig.from_dict(values)


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def _find_field(key: str, model_type: str) -> tuple[str, str]:
    """`section.name` or a bare name that belongs to exactly one section."""
    import dataclasses

    from foldformer.models import _classes

    _, model_config_class = _classes(model_type)
    sections = {
        "model": {f.name for f in dataclasses.fields(model_config_class)} | {"model_type"},
        "train": {f.name for f in dataclasses.fields(TrainConfig)},
        "data": {f.name for f in dataclasses.fields(DataConfig)},
    }
    key = key.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section in sections and name in sections[section]:
            return section, name
    else:
        owners = [s for s, names in sections.items() if key in names]
        if len(owners) == 1:
            return owners[0], key
        if len(owners) > 1:
            raise ConfigError(
                f"--{key} is ambiguous: write one of {[f'{s}.{key}' for s in owners]}"
            )
    raise ConfigError(f"unknown option --{key}: not a field of the model, train or data config")


def _parse_value(raw: str) -> Any:
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


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":  # an explicit index: several torch.cuda calls require one
        device_name = f"cuda:{local_rank if world_size > 1 else torch.cuda.current_device()}"
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


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


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_states() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every RNG the loop touches, as JSON-able values and tensors (nothing to unpickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return values, tensors


def set_rng_states(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# Checkpoints: model (safetensors) + tokenizer + trainer state, written atomically
# ---------------------------------------------------------------------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and p.is_dir())


def wrap_distributed(model: nn.Module, sharded: bool, device: torch.device) -> nn.Module:
    """FSDP2 (each block, then the whole model, sharded over the ranks) or DDP."""
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
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


# What a checkpoint holds beyond a loadable model directory (config, weights, tokenizer).
RESUME_FILES = (
    "optimizer.pt",
    "rng.safetensors",
    "stream_memory.safetensors",
    "trainer_state.json",
)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    stream_memory: Any,
    keep: int,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step_N: a loadable model directory plus everything resume needs.
    optimizer_state: the optimizer's state dict when it is not `optimizer.state_dict()` (FSDP
    gathers it whole first)."""
    from safetensors.torch import save_file

    final = out_dir / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    tokenizer.save(tmp)
    # Optimizer and scheduler hold only tensors and numbers: torch.load(weights_only=True)
    # reads them back without unpickling arbitrary objects.
    torch.save(
        {
            "optimizer": optimizer_state or optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        tmp / "optimizer.pt",
    )
    rng_values, rng_tensors = rng_states()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    if stream_memory is not None:
        save_file(stream_memory.state_dict(), str(tmp / "stream_memory.safetensors"))
    state = {"step": step, "rng": rng_values, **trainer_state}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic: a checkpoint either exists whole or not at all
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoints/step_* in it")
    return found[-1]


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    run: RunConfig,
    out_dir: str | Path,
    resume: str | Path | None = None,
    batch_source: Any | None = None,
) -> dict[str, Any]:
    """Train a model as `run` says; returns a summary (final losses, tokens, time).

    batch_source: a ready source (`next_batch`, `state_dict`, `load_state_dict`) to use instead
    of building one from `run.data.train`, e.g. a task of your own (see foldformer.demo).
    """
    from foldformer.data.sources import make_batch_source
    from foldformer.data.synthetic import answer_accuracy
    from foldformer.data.tokenizers import load_tokenizer

    cfg = run.train
    out_dir = Path(out_dir)
    rank, world_size, device = setup_distributed(cfg.device)
    is_main = rank == 0
    if device.type == "cuda" and cfg.memory_fraction > 0:
        torch.cuda.set_per_process_memory_fraction(cfg.memory_fraction, device)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    tokenizer = load_tokenizer(run.data.tokenizer)
    model_values = dict(run.model)
    model_type = model_values.pop("model_type", "folded")
    model_values.setdefault("vocab_size", tokenizer.vocab_size)
    if model_values["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"vocab_size={model_values['vocab_size']} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model_spec = (model_type, dict(model_values))  # what build_model needs for a plain copy
    model = build_model(*model_spec).to(device)
    segment_len = model.config.segment_len
    # Streams are stateful (memory carried across steps) when a step ends on a fold boundary.
    # A model whose fold is longer than a step (full attention) sees each step on its own.
    stateful = segment_len <= cfg.seq_len
    if stateful and cfg.seq_len % segment_len:
        raise ConfigError(f"seq_len={cfg.seq_len} is not a multiple of segment_len={segment_len}")

    source_args = dict(
        tokenizer=tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        segment_len=segment_len if stateful else cfg.seq_len, rank=rank, world_size=world_size, seed=cfg.seed,
        cache_dir=run.data.cache_dir or None,
    )  # fmt: skip
    if batch_source is not None:
        train_source = batch_source
    elif not run.data.train:
        raise ConfigError("no training data: give --data SPEC (docs/data.md lists the specs)")
    else:
        train_source = make_batch_source(run.data.train, **source_args)
    # Synthetic and BABILong tasks climb a curriculum driven by answer accuracy.
    curriculum = getattr(train_source, "curriculum", None)
    val_specs = run.data.val
    if not val_specs and cfg.eval_every and rank == 0 and batch_source is None:
        print("no validation data (--val-data SPEC): periodic validation is skipped")
    step, stream_memory, trainer_state, saved_optimizer = 0, None, {}, None
    if resume is not None:
        from safetensors.torch import load_file, load_model

        ckpt = find_resume_checkpoint(resume)
        load_model(unwrap(model), str(ckpt / "model.safetensors"), device=str(device))
        saved_optimizer = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
        saved_ranks = len(trainer_state["data"])
        if saved_ranks != world_size:
            raise ConfigError(
                f"--resume {ckpt}: it was written by {saved_ranks} process(es), this run has "
                f"{world_size}; resume with the same number of processes (each continues its "
                "own rows of the streams)"
            )
        step = trainer_state["step"]
        train_source.load_state_dict(trainer_state["data"][rank])
        if (ckpt / "stream_memory.safetensors").is_file():
            # Saved with every rank's rows in rank order: this rank continues its own rows.
            every_rank = unwrap(model).state_class.from_state_dict(
                load_file(str(ckpt / "stream_memory.safetensors"), device=str(device))
            )
            rows = (every_rank.batch_size or 0) // world_size  # None: a fresh peer state
            stream_memory = (
                every_rank.index(slice(rank * rows, (rank + 1) * rows)) if rows else every_rank
            )
        set_rng_states(trainer_state["rng"], load_file(str(ckpt / "rng.safetensors")))
        if is_main:
            print(f"resumed from {ckpt} at step {step}")

    sharded = cfg.fsdp and world_size > 1
    if world_size > 1:
        model = wrap_distributed(model, sharded, device)
    # After wrapping: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold.
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if saved_optimizer is not None:
        if sharded:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, saved_optimizer["optimizer"],
                                     options=full_state_dict_options())  # fmt: skip
        else:
            optimizer.load_state_dict(saved_optimizer["optimizer"])
        scheduler.load_state_dict(saved_optimizer["scheduler"])
    if cfg.compile:
        if hasattr(unwrap(model), "compile_fold"):
            unwrap(model).compile_fold()  # the fold step; the loop over folds stays eager
        else:
            model = torch.compile(model)
    # Without a curriculum nothing reads the logits: the folded model then computes the loss
    # chunk by chunk and never holds (B, T, V) logits.
    forward_args = {}
    if (
        curriculum is None
        and "return_logits" in inspect.signature(unwrap(model).forward).parameters
    ):
        forward_args["return_logits"] = False

    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out_dir / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    logger = MetricLogger(out_dir, enabled=is_main)
    n_params = unwrap(model).num_parameters()
    if is_main:
        print(
            f"{model_type} model: {n_params / 1e6:.2f}M non-embedding parameters, "
            f"{world_size} process(es) on {device.type}"
        )

    micro_rows = cfg.batch_size // cfg.grad_accum
    tokens_per_step = cfg.batch_size * cfg.seq_len * world_size
    progress = _progress_bar(cfg, step, is_main)
    val_loss = None
    started = time.time()
    last_log = time.time()
    last_log_step = step
    try:
        while step < cfg.max_steps:
            model.train()
            batch = train_source.next_batch()
            new_memory = []
            total_loss = torch.zeros((), device=device)
            answers = torch.zeros(2, device=device)  # rows answered correctly, rows answered
            for micro in range(cfg.grad_accum):
                rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
                memory = None if stream_memory is None else stream_memory.index(rows)
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast_context(device, cfg.precision):
                        out = model(
                            batch.input_ids[rows].to(device, non_blocking=True),
                            memory=memory,
                            labels=batch.labels[rows].to(device, non_blocking=True),
                            reset_mask=(
                                batch.reset_mask[rows].to(device, non_blocking=True)
                                if stateful
                                else None
                            ),
                            bptt=cfg.bptt,
                            checkpoint=cfg.checkpoint_folds,
                            **forward_args,
                        )
                    (out.loss / cfg.grad_accum).backward()
                total_loss += out.loss.detach() / cfg.grad_accum
                if stateful:  # otherwise the state is a whole row's key/value cache: drop it
                    new_memory.append(out.memory.detach())
                if curriculum is not None:
                    answers += torch.tensor(
                        answer_accuracy(out.logits.detach(), batch.labels[rows].to(device)),
                        device=device,
                    )
            # carried, gradient-free, to the next step
            stream_memory = type(new_memory[0]).concat(new_memory) if stateful else None
            del out, new_memory  # nothing of this step's forward lives on into validation
            grad_norm = (
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0
                else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if curriculum is not None:  # every rank moves to the next level together
                if world_size > 1:
                    dist.all_reduce(answers)
                if batch.meta.get("level", train_source.level) == train_source.level:
                    curriculum.update(int(answers[0]), int(answers[1]))

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if world_size > 1:
                    dist.all_reduce(total_loss, op=dist.ReduceOp.AVG)
                elapsed = time.time() - last_log
                tokens_per_s = tokens_per_step * (step - last_log_step) / max(elapsed, 1e-9)
                last_log, last_log_step = time.time(), step
                record = {
                    "step": step,
                    "loss": total_loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if curriculum is not None:
                    record["answer_accuracy"] = answers[0].item() / max(answers[1].item(), 1)
                    record["curriculum_level"] = train_source.level
                if device.type == "cuda":
                    record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(record)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        tok_s=f"{tokens_per_s:,.0f}",
                        **(
                            {"mem_gb": f"{record['max_memory_gb']:.1f}"}
                            if "max_memory_gb" in record
                            else {}
                        ),
                    )
            if progress is not None:
                progress.update(1)
            # a run stopped by its time guard is validated at its last step too, so that
            # final_val_loss is the final model's
            stopping = bool(cfg.max_minutes) and out_of_time(
                started, cfg.max_minutes, world_size, device
            )
            if (
                val_specs
                and cfg.eval_every
                and (step % cfg.eval_every == 0 or step == cfg.max_steps or stopping)
            ):
                val_loss = validate(
                    model, val_specs, source_args, cfg, device, world_size, stateful, forward_args
                )
                logger.log({"step": step, "val_loss": val_loss, "tokens": step * tokens_per_step})
            if stopping:
                if is_main:
                    print(f"\nstopping at step {step}: max_minutes={cfg.max_minutes} reached")
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                _save(out_dir, step, model, tokenizer, optimizer, scheduler, train_source,
                      stream_memory, cfg, rank, world_size, model_spec)  # fmt: skip
    except KeyboardInterrupt:
        if is_main:
            print(f"\ninterrupted at step {step}: saving a checkpoint to resume from")
        _save(out_dir, step, model, tokenizer, optimizer, scheduler, train_source,
              stream_memory, cfg, rank, world_size, model_spec)  # fmt: skip
        raise
    finally:
        if progress is not None:
            progress.close()
        logger.close()

    checkpoint = _save(out_dir, step, model, tokenizer, optimizer, scheduler, train_source,
                       stream_memory, cfg, rank, world_size, model_spec)  # fmt: skip
    final_dir = out_dir / "final"
    if is_main:  # the model and tokenizer of the last checkpoint, without the resume state
        shutil.rmtree(final_dir, ignore_errors=True)
        shutil.copytree(checkpoint, final_dir, ignore=shutil.ignore_patterns(*RESUME_FILES))
    summary = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "final_train_loss": logger.last.get("loss"),
        "final_val_loss": val_loss,
        "non_embedding_parameters": n_params,
        "out_dir": str(out_dir),
    }
    if is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if world_size > 1:
        dist.barrier()
    return summary


def _save(out_dir, step, model, tokenizer, optimizer, scheduler, source, stream_memory, cfg,
          rank, world_size, model_spec) -> Path | None:  # fmt: skip
    """Gather every rank's data position, then rank 0 writes the checkpoint (its path is
    returned there). Under FSDP every rank first helps gather the whole weights and optimizer
    state, and rank 0 writes them through a plain copy of the model: one format for all runs."""
    data_state = source.state_dict()
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, data_state)
        data_states = gathered
    else:
        data_states = [data_state]
    if world_size > 1 and stream_memory is not None:  # every rank's rows, in rank order
        states: list[Any] = [None] * world_size
        dist.all_gather_object(states, stream_memory.to("cpu"))
        stream_memory = type(stream_memory).concat(states)
    to_save, optimizer_state = model, None
    if cfg.fsdp and world_size > 1:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = full_state_dict_options()
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            to_save = build_model(*model_spec)
            to_save.load_state_dict(model_state)
    path = None
    if rank == 0:
        path = save_checkpoint(
            out_dir, step, to_save, tokenizer, optimizer, scheduler, {"data": data_states},
            stream_memory, cfg.keep_checkpoints,
            optimizer_state=optimizer_state,
        )  # fmt: skip
    if world_size > 1:
        dist.barrier()
    return path


def out_of_time(started: float, max_minutes: float, world_size: int, device) -> bool:
    """Rank 0's clock decides, so every rank stops at the same step."""
    late = torch.tensor(float(time.time() - started > 60 * max_minutes), device=device)
    if world_size > 1:
        dist.broadcast(late, src=0)
    return bool(late.item())


@torch.no_grad()
def validate(
    model,
    val_specs,
    source_args,
    cfg: TrainConfig,
    device,
    world_size,
    stateful: bool,
    forward_args: dict[str, Any],
) -> float:
    """Mean loss over the first eval_batches batches of the validation streams (memory carried)."""
    from foldformer.data.sources import make_batch_source

    model.eval()
    source = make_batch_source(val_specs, **{**source_args, "seed": 1234})
    total, memory = torch.zeros((), device=device), None
    micro_rows = cfg.batch_size // cfg.grad_accum  # the training step's micro-batches: what fits
    for _ in range(cfg.eval_batches):
        batch = source.next_batch()
        new_memory = []
        for micro in range(cfg.grad_accum):
            rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
            with autocast_context(device, cfg.precision):
                out = unwrap(model)(
                    batch.input_ids[rows].to(device),
                    memory=None if memory is None else memory.index(rows),
                    labels=batch.labels[rows].to(device),
                    reset_mask=batch.reset_mask[rows].to(device) if stateful else None,
                    **forward_args,  # the chunked loss: (B, T, V) logits do not fit a GPU
                )
            if stateful:  # otherwise the state is a whole row's key/value cache: drop it
                new_memory.append(out.memory)
            total += out.loss.float() / cfg.grad_accum
        memory = type(new_memory[0]).concat(new_memory) if stateful else None
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item() / cfg.eval_batches


class MetricLogger:
    """Metrics to out_dir/metrics.jsonl and TensorBoard (out_dir/tb)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.last: dict[str, Any] = {}
        self.writer = None
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
        except ImportError:  # tensorboard is a dependency; tolerate its absence anyway
            self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        self.last.update(record)
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _progress_bar(cfg: TrainConfig, step: int, is_main: bool):
    if not (cfg.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
