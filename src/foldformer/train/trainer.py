"""The Trainer: one loop for every model in the project, from one CPU to several GPUs.

Each batch row is a continuous stream: the model's memory for that row is carried from one
step to the next (detached at the batch edge, as Transformer-XL carries its cache) and reset
at document boundaries. Under `torchrun --nproc_per_node N` the same run trains with DDP
(NCCL on GPUs, gloo on CPUs), each rank reading its own share of the streams.

A step, always in this order (`Trainer.train_step`): every micro-batch forward and backward
with its rows' memory, the memory carried on, gradients clipped, optimizer and schedule
stepped, gradients zeroed.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from foldformer.config import ConfigError
from foldformer.models import build_model
from foldformer.train.checkpoint import (
    COMPLETE,
    RESUME_FILES,
    Checkpointer,
    find_resume_checkpoint,
    init_model_config,
    init_source,
    init_tokenizer,
    load_init_weights,
)
from foldformer.train.config import RunConfig, TrainConfig
from foldformer.train.metrics import MetricLogger, progress_bar
from foldformer.train.optim import apply_hyperparameters, make_optimizer, make_scheduler
from foldformer.train.parallel import any_rank, setup_distributed, unwrap, wrap_distributed


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the run saved its last finished step; the message says how to continue."""


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_writable(out_dir: Path) -> Path:
    """--out, made and tried before any work (tokenizing a corpus can take minutes)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise ConfigError(f"--out {out_dir} is not a writable folder: {error.strerror}") from None
    return out_dir


@contextlib.contextmanager
def interrupt_flag():
    """A Ctrl-C sets the flag (the loop stops after the step it is in); a second one stops at
    once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over the micro-batches (on the device: no sync)
    grad_norm: torch.Tensor | None
    answers: torch.Tensor  # rows answered correctly, rows answered (curriculum tasks)


class Trainer:
    """Everything a run needs, built in a fixed order (seeds, tokenizer, model, data, resume,
    parallel wrapping, optimizer, compilation), then `train()`.

    batch_source: a ready source (`next_batch`, `state_dict`, `load_state_dict`) to use instead
    of building one from `run.data.train`, e.g. a task of your own (see foldformer.demo).
    """

    def __init__(
        self,
        run: RunConfig,
        out_dir: str | Path,
        resume: str | Path | None = None,
        batch_source: Any | None = None,
        allow_config_change: bool = False,
    ):
        from foldformer.data.sources import make_batch_source
        from foldformer.data.tokenizers import load_tokenizer

        self.run, self.cfg = run, run.train
        cfg = self.cfg
        self.out_dir = check_writable(Path(out_dir))
        if resume is not None:  # a checkpoint to resume from exists, before any work
            find_resume_checkpoint(resume)
        self.rank, self.world_size, self.device = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        if self.device.type == "cuda" and cfg.memory_fraction > 0:
            torch.cuda.set_per_process_memory_fraction(cfg.memory_fraction, self.device)
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)

        model_values = dict(run.model)
        self.model_type = model_values.pop("model_type", "folded")
        if cfg.init_from:  # a fine-tune: the source's model and tokenizer, recorded in the run
            source = init_source(cfg.init_from)
            run.data.tokenizer = init_tokenizer(source, run.data.tokenizer)
            model_values = init_model_config(source, self.model_type, model_values)
            run.model = {"model_type": self.model_type, **model_values}
        self.tokenizer = load_tokenizer(run.data.tokenizer)
        model_values.setdefault("vocab_size", self.tokenizer.vocab_size)
        if model_values["vocab_size"] < self.tokenizer.vocab_size:
            raise ConfigError(
                f"vocab_size={model_values['vocab_size']} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}"
            )
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model_spec = (self.model_type, dict(model_values))  # build_model's arguments
        model = build_model(*model_spec).to(self.device)
        if cfg.init_from and resume is None:  # a resume reads the fine-tuned weights instead
            load_init_weights(model, source)
            if self.is_main:
                print(f"initialised from {source}")
        if getattr(model.config, "attention", None) == "flex" and self.device.type == "cpu":
            raise ConfigError(
                "attention='flex' cannot train on the CPU (torch has no CPU backward for "
                "FlexAttention); use attention='sdpa' or a GPU"
            )
        segment_len = model.config.segment_len
        # Streams are stateful (memory carried across steps) when a step ends on a fold
        # boundary. A model whose fold is longer than a step (full attention) sees each step
        # on its own.
        self.stateful = segment_len <= cfg.seq_len
        if self.stateful and cfg.seq_len % segment_len:
            raise ConfigError(
                f"seq_len={cfg.seq_len} is not a multiple of segment_len={segment_len}"
            )

        self.source_args = dict(
            tokenizer=self.tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
            segment_len=segment_len if self.stateful else cfg.seq_len, rank=self.rank,
            world_size=self.world_size, seed=cfg.seed, cache_dir=run.data.cache_dir or None,
        )  # fmt: skip
        if batch_source is not None:
            self.source = batch_source
        elif not run.data.train:
            raise ConfigError("no training data: give --data SPEC (docs/data.md lists the specs)")
        else:
            self.source = make_batch_source(run.data.train, **self.source_args)
        # Synthetic and BABILong tasks climb a curriculum driven by answer accuracy.
        self.curriculum = getattr(self.source, "curriculum", None)
        self.val_specs = run.data.val
        if not self.val_specs and cfg.eval_every and self.is_main and batch_source is None:
            print("no validation data (--val-data SPEC): periodic validation is skipped")

        self.step, self.stream_memory, resumed = 0, None, None
        # Token positions read: every rank's, up to the last resume (exact), plus this
        # process's own since (summed over the ranks when reported: task rows differ in length).
        self.tokens_before, self.local_tokens = 0, 0
        self.checkpointer = Checkpointer(self.out_dir, run, self.rank, self.world_size, model_spec)
        if resume is not None:
            resumed = self.checkpointer.load(
                resume, model, self.source, self.device, self.stateful, allow_config_change
            )
            self.step, self.stream_memory = resumed.step, resumed.memory
            self.tokens_before = resumed.tokens
            if self.is_main:
                print(f"resumed from {resumed.checkpoint} at step {self.step}")

        self.sharded = cfg.fsdp and self.world_size > 1
        if self.world_size > 1:
            model = wrap_distributed(
                model, self.sharded, self.device, cfg.fsdp_reshard_after_forward
            )
        # After wrapping: FSDP2 replaces the parameters by sharded ones, which the optimizer
        # must hold.
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        if resumed is not None:
            self._load_optimizer(model, resumed.optimizer, resumed.changed)
        if cfg.compile:
            # the segment step (folded, RMT); the loop over segments stays eager
            if not unwrap(model).compile_fold():
                model = torch.compile(model)
        self.model = model
        # Without a curriculum nothing reads the logits: the folded model then computes the
        # loss chunk by chunk and never holds (B, T, V) logits.
        self.forward_args = {}
        if (
            self.curriculum is None
            and "return_logits" in inspect.signature(unwrap(model).forward).parameters
        ):
            self.forward_args["return_logits"] = False

        if self.is_main:
            text = json.dumps(run.to_dict(), indent=2) + "\n"
            (self.out_dir / "run_config.json").write_text(text)
        self.n_params = unwrap(model).num_parameters()
        if self.is_main:
            print(
                f"{self.model_type} model: {self.n_params / 1e6:.2f}M non-embedding parameters, "
                f"{self.world_size} process(es) on {self.device.type}"
            )
        if resumed is not None and resumed.tokens is None:  # written before tokens were kept
            self.tokens_before = self.step * cfg.batch_size * cfg.seq_len * self.world_size
        self.resumed = resume is not None

    def _load_optimizer(self, model: nn.Module, saved: dict[str, Any], changed: bool) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            from foldformer.train.parallel import full_state_dict_options

            set_optimizer_state_dict(model, self.optimizer, saved["optimizer"],
                                     options=full_state_dict_options())  # fmt: skip
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if changed:  # hyper-parameters a resume was allowed to change: the new ones
            apply_hyperparameters(self.optimizer, self.scheduler, self.cfg)

    # -----------------------------------------------------------------------------------------

    def train_step(self, batch) -> StepResult:
        """One optimizer step on `batch` (the whole step: micro-batches, carried memory,
        resets, clipping, optimizer and schedule)."""
        from foldformer.data.synthetic import answer_accuracy

        cfg, device, model = self.cfg, self.device, self.model
        model.train()
        # a task's rows are as long as its curriculum level, not seq_len
        self.local_tokens += batch.input_ids.numel()
        micro_rows = cfg.batch_size // cfg.grad_accum
        new_memory = []
        total_loss = torch.zeros((), device=device)
        answers = torch.zeros(2, device=device)  # rows answered correctly, rows answered
        for micro in range(cfg.grad_accum):
            rows = slice(micro * micro_rows, (micro + 1) * micro_rows)
            memory = None if self.stream_memory is None else self.stream_memory.index(rows)
            sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast_context(device, cfg.precision):
                    out = model(
                        batch.input_ids[rows].to(device, non_blocking=True),
                        memory=memory,
                        labels=batch.labels[rows].to(device, non_blocking=True),
                        reset_mask=(
                            batch.reset_mask[rows].to(device, non_blocking=True)
                            if self.stateful
                            else None
                        ),
                        bptt=cfg.bptt,
                        checkpoint=cfg.checkpoint_folds,
                        **self.forward_args,
                    )
                (out.loss / cfg.grad_accum).backward()
            total_loss += out.loss.detach() / cfg.grad_accum
            if self.stateful:  # otherwise the state is a whole row's key/value cache: drop it
                new_memory.append(out.memory.detach())
            if self.curriculum is not None:
                answers += torch.tensor(
                    answer_accuracy(out.logits.detach(), batch.labels[rows].to(device)),
                    device=device,
                )
        # carried, gradient-free, to the next step
        self.stream_memory = type(new_memory[0]).concat(new_memory) if self.stateful else None
        del out, new_memory  # nothing of this step's forward lives on into validation
        grad_norm = (
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if cfg.grad_clip > 0
            else None
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.curriculum is not None:  # every rank moves to the next level together
            if self.world_size > 1:
                dist.all_reduce(answers)
            if batch.meta.get("level", self.source.level) == self.source.level:
                self.curriculum.update(int(answers[0]), int(answers[1]))
        return StepResult(total_loss, grad_norm, answers)

    def train(self) -> dict[str, Any]:
        """Steps until max_steps (or max_minutes, or Ctrl-C), validating and saving on the
        way; returns the summary."""
        cfg, started = self.cfg, time.time()
        self.open_metrics(started)
        try:
            with interrupt_flag() as interrupted:
                while self.step < cfg.max_steps:
                    self.log_step(self.train_step(self.source.next_batch()))
                    late = bool(cfg.max_minutes) and time.time() - started > 60 * cfg.max_minutes
                    stop, late = any_rank(
                        [interrupted.is_set(), late], self.world_size, self.device
                    )
                    if stop:
                        raise self.interrupt()
                    # the time guard's last step is validated too: final_val_loss is the final model's
                    if self.val_specs and cfg.eval_every and (self.every(cfg.eval_every) or late):
                        self.validate()
                    if late:
                        if self.is_main:
                            print(
                                f"\nstopping at step {self.step}: max_minutes={cfg.max_minutes} reached"
                            )
                        break
                    if cfg.save_every and self.every(cfg.save_every) and self.step < cfg.max_steps:
                        self.save()
        finally:
            self.close_metrics()
        return self.finish()

    def tokens(self) -> int:
        """Token positions every rank has read (padding included). A collective with more
        than one process: every rank calls it."""
        if self.world_size == 1:
            return self.tokens_before + self.local_tokens
        local = torch.tensor(self.local_tokens, device=self.device, dtype=torch.int64)
        dist.all_reduce(local)
        return self.tokens_before + int(local)

    def every(self, n: int) -> bool:
        """Every n steps, and at the last."""
        return self.step % n == 0 or self.step == self.cfg.max_steps

    def open_metrics(self, started: float) -> None:
        resume_step = self.step if self.resumed else None
        self.logger = MetricLogger(self.out_dir, enabled=self.is_main, resume_step=resume_step)
        self.progress = progress_bar(
            self.cfg.progress and self.is_main, self.cfg.max_steps, self.step,
            60 * self.cfg.max_minutes, started,
        )  # fmt: skip
        self.val_loss = None
        self.last_log, self.last_log_tokens = time.time(), self.tokens()

    def close_metrics(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.logger.close()

    def log_step(self, result: StepResult) -> None:
        cfg, step = self.cfg, self.step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            loss = result.loss
            if self.world_size > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            elapsed, tokens = time.time() - self.last_log, self.tokens()
            tokens_per_s = (tokens - self.last_log_tokens) / max(elapsed, 1e-9)
            self.last_log, self.last_log_tokens = time.time(), tokens
            record = {
                "step": step,
                "loss": loss.item(),
                "lr": self.scheduler.get_last_lr()[0],
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
            }
            if result.grad_norm is not None:
                record["grad_norm"] = float(result.grad_norm)
            if self.curriculum is not None:
                answers = result.answers
                record["answer_accuracy"] = answers[0].item() / max(answers[1].item(), 1)
                record["curriculum_level"] = self.source.level
            if self.device.type == "cuda":
                record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.logger.log(record)
            if self.progress is not None:
                memory = (
                    {"mem_gb": f"{record['max_memory_gb']:.1f}"}
                    if "max_memory_gb" in record
                    else {}
                )
                self.progress.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", **memory
                )
        if self.progress is not None:
            self.progress.update(step)

    def validate(self) -> None:
        self.val_loss = validate(
            self.model, self.val_specs, self.source_args, self.cfg, self.device,
            self.world_size, self.stateful, self.forward_args,
        )  # fmt: skip
        record = {"step": self.step, "val_loss": self.val_loss}
        self.logger.log(record | {"tokens": self.tokens()})

    def save(self) -> Path | None:
        return self.checkpointer.save(
            self.step, self.tokens(), self.model, self.tokenizer, self.optimizer,
            self.scheduler, self.source, self.stream_memory,
        )  # fmt: skip

    def interrupt(self) -> TrainingInterrupted:
        """Save the last finished step; the exception to end the run with."""
        self.save()
        return TrainingInterrupted(
            f"interrupted at step {self.step}, saved in {self.out_dir}/checkpoints: continue "
            f"with --resume {self.out_dir}"
        )

    def finish(self) -> dict[str, Any]:
        """The last checkpoint, final/ (the model without the resume state), summary.json."""
        checkpoint, tokens = self.save(), self.tokens()
        final_dir = self.out_dir / "final"
        if self.is_main:
            shutil.rmtree(final_dir, ignore_errors=True)
            shutil.copytree(
                checkpoint, final_dir, ignore=shutil.ignore_patterns(*RESUME_FILES, COMPLETE)
            )
        summary = {
            "steps": self.step,
            "tokens": tokens,
            "final_train_loss": self.logger.last.get("loss"),
            "final_val_loss": self.val_loss,
            "non_embedding_parameters": self.n_params,
            "out_dir": str(self.out_dir),
        }
        if self.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.world_size > 1:
            dist.barrier()
        return summary


def train(
    run: RunConfig,
    out_dir: str | Path,
    resume: str | Path | None = None,
    batch_source: Any | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Train a model as `run` says; returns a summary (final losses, tokens, time). See
    `Trainer` for the arguments."""
    owns_group = not dist.is_initialized()  # a group the caller made stays the caller's
    trainer = None
    try:
        trainer = Trainer(run, out_dir, resume, batch_source, allow_config_change)
        return trainer.train()
    finally:
        # Left to the interpreter's exit, gloo's threads now and then abort the process
        # ("terminate called without an active exception") after a finished run. The DDP or
        # FSDP2 wrappers hold the group too: they go first, so destroying it frees it here.
        if owns_group and dist.is_initialized():
            del trainer
            gc.collect()
            dist.destroy_process_group()


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
