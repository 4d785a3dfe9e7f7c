"""Checkpoints: a loadable model directory (config.json, model.safetensors, tokenizer) plus what
a resume needs (optimizer and schedule, every rank's data position and carried memory, RNG
states, the run config). And the start of a fine-tune (`--init-from`): another run's model
folder, whose weights, model config and tokenizer a new run starts from.

A checkpoint is written in checkpoints/step_N.tmp, its list of files (complete.json) last, then
renamed to step_N. Resume takes the newest step_N with that list and every file on it, removes
the `.tmp` folders a kill or a full disk left, and refuses a checkpoint of another shape, data
or (unless allowed) other hyper-parameters.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from foldformer.config import KERNEL_FIELDS, ConfigError, read_model_config
from foldformer.models import build_model
from foldformer.train.config import RunConfig, model_config_class
from foldformer.train.parallel import full_state_dict_options, unwrap

# What a checkpoint holds beyond a loadable model directory (config, weights, tokenizer).
RESUME_FILES = (
    "optimizer.pt",
    "rng.safetensors",
    "stream_memory.safetensors",
    "trainer_state.json",
)
COMPLETE = "complete.json"  # written last: the files of the checkpoint and their sizes
NAME = re.compile(r"step_\d+")

# Fields a resume may never change: the weights' shape, the rows and their length, the data.
FIXED = ("train.batch_size", "train.seq_len", "train.seed", "data.train", "data.tokenizer")
# Fields that change the result: a resume keeps them unless --allow-config-change.
HYPERPARAMETERS = tuple(
    f"train.{name}"
    for name in ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                 "grad_clip", "bptt", "grad_accum", "precision")
)  # fmt: skip


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


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if NAME.fullmatch(p.name) and (p / COMPLETE).is_file())


def remove_stale(out_dir: Path) -> None:
    """The step_N.tmp folders of writes that never finished (a kill, a full disk)."""
    root = Path(out_dir) / "checkpoints"
    for tmp in root.glob("step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_point(step: int) -> None:
    """FOLDFORMER_TEST_KILL_IN_SAVE=N: SIGKILL this process halfway through writing the
    checkpoint of step N (how tests/test_faults.py lands a kill inside a write)."""
    if os.environ.get("FOLDFORMER_TEST_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


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

    final = Path(out_dir) / "checkpoints" / f"step_{step:08d}"
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
    _kill_point(step)
    rng_values, rng_tensors = rng_states()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    if stream_memory is not None:
        save_file(stream_memory.state_dict(), str(tmp / "stream_memory.safetensors"))
    state = {"step": step, "rng": rng_values, **trainer_state}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint, else the newest complete one of the run there."""
    path = Path(path)
    if (path / "trainer_state.json").is_file() or (path / COMPLETE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such run or checkpoint folder")
    found = checkpoint_dirs(path)
    if not found and (path / "config.json").is_file():
        raise ConfigError(
            f"--resume {path}: a model folder, without the training state a resume continues; "
            f"to fine-tune its weights in a new run (new data, fresh optimizer) use --init-from {path}"
        )
    if not found:
        raise FileNotFoundError(f"--resume {path}: no complete checkpoint (checkpoints/step_*)")
    return found[-1]


def check_parts(ckpt: Path, stateful: bool) -> None:
    """Every file the checkpoint lists (or, written before the list existed, needs) is there."""
    marker = ckpt / COMPLETE
    if marker.is_file():
        expected = json.loads(marker.read_text())["files"]
    else:
        expected = dict.fromkeys(["config.json", "model.safetensors", *RESUME_FILES[:2]])
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        if stateful and step > 0:  # the rows' memory after the last step
            expected["stream_memory.safetensors"] = None
    for name, size in expected.items():
        part = ckpt / name
        if not part.is_file():
            raise ConfigError(f"--resume {ckpt}: the checkpoint has no {name}; it cannot resume")
        if size is not None and part.stat().st_size != size:
            raise ConfigError(f"--resume {ckpt}: {name} has {part.stat().st_size} bytes, the "
                              f"checkpoint wrote {size}; it cannot resume")  # fmt: skip


def _flat(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    flat = {}
    for key in keys:
        section, name = key.split(".")
        flat[key] = values.get(section, {}).get(name)
    return flat


def config_changes(
    ckpt: Path, saved: dict[str, Any] | None, run: RunConfig, model_config: dict[str, Any]
) -> tuple[list[str], dict[str, list[Any]]]:
    """(fixed fields that changed, hyper-parameters that changed: [old, new]) from the run the
    checkpoint was written by to `run`."""
    saved_model = json.loads((ckpt / "config.json").read_text())
    model_config = json.loads(json.dumps(model_config))  # tuples -> lists, as read back
    fixed = [
        f"model.{k} {saved_model[k]!r} -> {model_config.get(k)!r}"
        for k in sorted(saved_model)  # a field added since keeps its default: no change
        if saved_model[k] != model_config.get(k) and k not in KERNEL_FIELDS
    ]
    hyper: dict[str, list[Any]] = {}
    if saved is not None:
        new = json.loads(json.dumps(run.to_dict()))
        old_fixed, new_fixed = _flat(saved, FIXED), _flat(new, FIXED)
        fixed += [f"{k} {old_fixed[k]!r} -> {new_fixed[k]!r}" for k in FIXED
                  if old_fixed[k] != new_fixed[k]]  # fmt: skip
        old_hyper, new_hyper = _flat(saved, HYPERPARAMETERS), _flat(new, HYPERPARAMETERS)
        hyper = {k: [old_hyper[k], new_hyper[k]] for k in HYPERPARAMETERS
                 if old_hyper[k] != new_hyper[k]}  # fmt: skip
    return fixed, hyper


@dataclass
class Resumed:
    checkpoint: Path
    step: int
    tokens: int | None  # token positions read by every rank (None: an older checkpoint)
    memory: Any  # every row's carried memory (None: fresh)
    optimizer: dict[str, Any]  # optimizer and scheduler state
    changed: bool  # hyper-parameters changed (allowed): the optimizer takes the new ones


class Checkpointer:
    """Saves and restores a run. Every rank takes part in a save (each gives its data position
    and rows of memory); rank 0 writes."""

    def __init__(self, out_dir: Path, run: RunConfig, rank: int, world_size: int, model_spec):
        self.out_dir, self.run = out_dir, run
        self.rank, self.world_size = rank, world_size
        self.sharded = run.train.fsdp and world_size > 1
        self.model_spec = model_spec  # what build_model needs for a plain copy (FSDP)
        if rank == 0:
            remove_stale(out_dir)

    def save(self, step, tokens, model, tokenizer, optimizer, scheduler, source, stream_memory):
        """Gather every rank's data position, then rank 0 writes the checkpoint (its path is
        returned there). Under FSDP every rank first helps gather the whole weights and
        optimizer state, and rank 0 writes them through a plain copy of the model: one format
        for all runs."""
        data_states = [source.state_dict()]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, data_states[0])
            data_states = gathered
        if self.world_size > 1 and stream_memory is not None:  # every rank's rows, in order
            states: list[Any] = [None] * self.world_size
            dist.all_gather_object(states, stream_memory.to("cpu"))
            stream_memory = type(stream_memory).concat(states)
        to_save, optimizer_state = model, None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = full_state_dict_options()
            model_state = get_model_state_dict(model, options=options)
            optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
            if self.rank == 0:
                to_save = build_model(*self.model_spec)
                to_save.load_state_dict(model_state)
        path = None
        if self.rank == 0:
            trainer_state = {"data": data_states, "run": self.run.to_dict(), "tokens": tokens}
            path = save_checkpoint(
                self.out_dir, step, to_save, tokenizer, optimizer, scheduler, trainer_state,
                stream_memory, self.run.train.keep_checkpoints, optimizer_state=optimizer_state,
            )  # fmt: skip
        if self.world_size > 1:
            dist.barrier()
        return path

    def load(self, resume, model, source, device, stateful: bool, allow_config_change: bool):
        """Restore weights, data position, carried memory and RNG states from `resume` (a run
        or a checkpoint folder); the optimizer state is loaded by the caller, once the
        model is wrapped."""
        from safetensors.torch import load_file, load_model

        if self.rank == 0:
            remove_stale(Path(resume))
        ckpt = find_resume_checkpoint(resume)
        check_parts(ckpt, stateful)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved_ranks = len(state["data"])
        if saved_ranks != self.world_size:
            raise ConfigError(
                f"--resume {ckpt}: it was written by {saved_ranks} process(es), this run has "
                f"{self.world_size}; resume with the same number of processes (each continues "
                "its own rows of the streams)"
            )
        model_config = {"model_type": self.model_spec[0], **unwrap(model).config.to_dict()}
        changed = self._check_config(ckpt, state, model_config, allow_config_change)
        load_model(unwrap(model), str(ckpt / "model.safetensors"), device=str(device))
        saved_optimizer = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        source.load_state_dict(state["data"][self.rank])
        memory = None
        if (ckpt / "stream_memory.safetensors").is_file():
            # Saved with every rank's rows in rank order: this rank continues its own rows.
            every_rank = unwrap(model).state_class.from_state_dict(
                load_file(str(ckpt / "stream_memory.safetensors"), device=str(device))
            )
            rows = (every_rank.batch_size or 0) // self.world_size  # None: a fresh peer state
            memory = (
                every_rank.index(slice(self.rank * rows, (self.rank + 1) * rows))
                if rows
                else every_rank
            )
        set_rng_states(state["rng"], load_file(str(ckpt / "rng.safetensors")))
        return Resumed(ckpt, state["step"], state.get("tokens"), memory, saved_optimizer, changed)

    def _check_config(self, ckpt, state, model_config, allow: bool) -> bool:
        """Refuse another shape or data; other hyper-parameters only when allowed, and then
        recorded in the run config (run_config.json and every later checkpoint)."""
        saved = state.get("run")
        legacy = ckpt.parent.parent / "run_config.json"  # checkpoints written before "run"
        if saved is None and legacy.is_file():
            saved = json.loads(legacy.read_text())
        fixed, hyper = config_changes(ckpt, saved, self.run, model_config)
        if fixed:
            raise ConfigError(
                f"--resume {ckpt}: {'; '.join(fixed)}: a resume continues the same model on "
                f"the same data; start a new run (another --out) instead, with --init-from {ckpt} "
                "to fine-tune these weights"
            )
        changed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in hyper.items())
        if hyper and not allow:
            raise ConfigError(
                f"--resume {ckpt}: {changed} differ from the checkpoint's run; pass "
                "--allow-config-change to resume with the new values"
            )
        self.run.resumes = list((saved or {}).get("resumes", []))
        if hyper:
            entry = {"step": state["step"], "checkpoint": str(ckpt), "changed": hyper}
            self.run.resumes.append(entry)
            if self.rank == 0:
                print(f"resuming with changed hyper-parameters: {changed}")
        return bool(hyper)


# ---------------------------------------------------------------------------------------------
# Fine-tuning: --init-from
# ---------------------------------------------------------------------------------------------

# Model fields a fine-tune may change: how the weights are used, not what they are. Any other
# field keeps the source's value (a change is refused by name).
FINETUNE_FIELDS = ("segment_len", "memory_len", "dropout", *KERNEL_FIELDS)


def init_source(path: str | Path) -> Path:
    """The model folder of `--init-from`: the folder itself, or a run's final model."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"--init-from {path}: not a model folder (config.json and model.safetensors); give "
            "RUN, RUN/final, RUN/checkpoints/step_N or a save_pretrained folder"
        )
    return path


def init_model_config(source: Path, model_type: str, given: dict[str, Any]) -> dict[str, Any]:
    """The model fields of a fine-tune of `source`: its own, with the FINETUNE_FIELDS the run
    gives (`given`: the fields the preset, file or command line set)."""
    found, values = read_model_config(source)
    if found != model_type:
        raise ConfigError(
            f"--init-from {source} holds a {found!r} model, the run a {model_type!r} one: add "
            f"--model_type {found}"
        )
    config = model_config_class(found).from_dict(values)
    changed = [f"{k} {getattr(config, k)!r} -> {v!r}" for k, v in given.items()
               if k not in FINETUNE_FIELDS and getattr(config, k) != v]  # fmt: skip
    if changed:
        raise ConfigError(
            f"--init-from {source}: {'; '.join(changed)}: a fine-tune keeps the source's model "
            f"(only {', '.join(FINETUNE_FIELDS)} may change)"
        )
    return config.replace(**{k: v for k, v in given.items() if k in FINETUNE_FIELDS}).to_dict()


def init_tokenizer(source: Path, tokenizer: str) -> str:
    """The run's tokenizer: the source's (the weights read its token ids); `tokenizer`, the
    run's data.tokenizer, may name it again or be left at "bytes"."""
    from foldformer.data.tokenizers import ByteTokenizer, load_tokenizer

    try:
        own = load_tokenizer(source)
    except FileNotFoundError:  # a folder saved without its tokenizer: the run's
        return tokenizer
    if tokenizer == "bytes" or load_tokenizer(tokenizer).fingerprint() == own.fingerprint():
        return "bytes" if isinstance(own, ByteTokenizer) else str(source)
    raise ConfigError(
        f"--init-from {source}: tokenizer {tokenizer!r} is not the one the weights were trained "
        f"with ({own.name}); leave --tokenizer out to use the source's"
    )


def load_init_weights(model: nn.Module, source: Path) -> None:
    """Copy `source`'s weights into `model`, refusing names and shapes that do not map."""
    from safetensors.torch import load_file

    tensors = load_file(str(source / "model.safetensors"))
    own = model.state_dict()
    read = {own[k].data_ptr() for k in tensors if k in own}  # a tied weight is read once
    problems = [f"{k} {tuple(t.shape)} in the source, {tuple(own[k].shape)} here"
                for k, t in tensors.items() if k in own and t.shape != own[k].shape]  # fmt: skip
    problems += [f"{k} is not in this model" for k in tensors if k not in own]
    problems += [f"{k} is not in the source" for k in own
                 if k not in tensors and own[k].data_ptr() not in read]  # fmt: skip
    if problems:
        raise ConfigError(f"--init-from {source}: the weights do not map: {'; '.join(problems)}")
    model.load_state_dict(tensors, strict=False)
