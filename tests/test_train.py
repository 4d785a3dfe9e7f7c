"""The training loop: it learns, resumes exactly (one process, DDP and FSDP), and two processes
follow the single-process curve."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from foldformer.cli import main as cli_main
from foldformer.config import ConfigError
from foldformer.train import load_run_config, lr_factor, train

BOOKS = Path(__file__).resolve().parent / "fixtures" / "books"  # excerpts of three books
SMALL_MODEL = dict(model_type="folded", d_model=32, n_layers=2, n_heads=4, segment_len=8,
                   memory_len=8)  # fmt: skip


def small_run(data: list[str], **train_overrides):
    run = load_run_config()
    run.model.update(SMALL_MODEL)
    run.data.train = data
    run.data.cache_dir = train_overrides.pop("cache_dir")
    values = dict(batch_size=4, seq_len=32, lr=3e-3, warmup_steps=5, max_steps=10,
                  eval_every=0, save_every=0, log_every=1, progress=False)  # fmt: skip
    values.update(train_overrides)
    run.train = run.train.replace(**values)
    return run


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_on_a_synthetic_task_learns(tmp_path):
    run = small_run(["synthetic:recall?key_len=1&n_folds=2&max_folds=2"], cache_dir=str(tmp_path / "c"),
                    max_steps=80, lr=3e-3, batch_size=8)  # fmt: skip
    train(run, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5, losses
    # the final model is a loadable directory with its tokenizer
    from foldformer.data.tokenizers import load_tokenizer
    from foldformer.models import load_model

    assert load_model(tmp_path / "run" / "final").num_parameters() > 0
    assert load_tokenizer(tmp_path / "run" / "final").vocab_size == 257


def test_tokens_count_every_position_a_task_batch_holds(tmp_path):
    """A task's rows are as long as its curriculum level, not seq_len: the logged and summed
    tokens are the positions of the batches read (the old count, steps x rows x seq_len, was
    16 times too low here at the top level)."""
    from foldformer.data.sources import build_batch_source
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.train import Trainer

    class Counted:  # the task, counting what it hands out
        def __init__(self, source):
            self.source, self.positions = source, []

        def next_batch(self):
            batch = self.source.next_batch()
            self.positions.append(batch.input_ids.numel())
            return batch

        def __getattr__(self, name):
            return getattr(self.source, name)

    run = small_run([], cache_dir=str(tmp_path / "c"), max_steps=12, log_every=3)
    task = Counted(build_batch_source("synthetic:recall?key_len=1&n_folds=16&max_folds=64",
                                      ByteTokenizer(), batch_size=4, seq_len=32, segment_len=8))  # fmt: skip
    summary = Trainer(run, tmp_path / "run", batch_source=task).train()
    assert len(task.positions) == 12 and min(task.positions) > 4 * 32, task.positions
    assert summary["tokens"] == sum(task.positions)
    logged = [r["tokens"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == [sum(task.positions[:k]) for k in (3, 6, 9, 12)]


def test_stopped_and_resumed_run_reaches_the_same_weights(tmp_path):
    data = [str(BOOKS / "pg35.txt")]
    common = dict(cache_dir=str(tmp_path / "c"), max_steps=8, save_every=4)
    # the model uses dropout so that RNG state is part of what must be restored
    straight = small_run(data, **common)
    straight.model["dropout"] = 0.1
    train(straight, tmp_path / "straight")

    stopped = small_run(data, **{**common, "max_steps": 4})
    stopped.model["dropout"] = 0.1
    train(stopped, tmp_path / "resumed")
    resumed = small_run(data, **common)
    resumed.model["dropout"] = 0.1
    train(resumed, tmp_path / "resumed", resume=tmp_path / "resumed")

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    losses_a = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    losses_b = [r["loss"] for r in read_metrics(tmp_path / "resumed")]
    assert losses_a == losses_b
    # the token count goes on from the checkpoint
    tokens = [
        [r["tokens"] for r in read_metrics(tmp_path / out)] for out in ("straight", "resumed")
    ]
    assert tokens[0] == tokens[1] == [4 * 32 * k for k in range(1, 9)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp_gathered"])
def test_two_gloo_processes_follow_the_single_process_curve_and_resume_exactly(tmp_path, parallel):
    args = ["train", "--data", str(BOOKS / "pg35.txt"),
            "--model_type", "folded", "--d_model", "32", "--n_layers", "2", "--n_heads", "4",
            "--segment_len", "8", "--memory_len", "8", "--seq_len", "32", "--lr", "3e-3",
            "--warmup_steps", "3", "--eval_every", "0", "--save_every", "3", "--log_every", "1",
            "--progress", "false", "--cache_dir", str(tmp_path / "c"), "--device", "cpu"]  # fmt: skip
    assert cli_main([*args, "--max-steps", "6", "--batch_size", "8",
                     "--out", str(tmp_path / "single")]) == 0  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def two_processes(out: str, steps: int, *extra: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(free_port()), "-m", "foldformer.cli", *args,
             "--fsdp", str(parallel != "ddp").lower(), "--batch_size", "4",
             "--fsdp_reshard_after_forward", str(parallel != "fsdp_gathered").lower(),
             "--max-steps", str(steps), "--out", str(tmp_path / out), *extra],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]  # what torchrun's ranks printed

    two_processes("straight", 6)
    single = [r["loss"] for r in read_metrics(tmp_path / "single")]
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert len(single) == len(straight) == 6
    # Same global batch (2 x 4 rows = 8 rows): the curves agree up to the per-rank averaging of
    # rows with different numbers of scored tokens (document padding) and float reduction order.
    for s, d in zip(single, straight, strict=True):
        assert abs(s - d) <= 2e-3 * abs(s), (single, straight)
    assert single[-1] < single[0]

    # Stopped after 3 steps and resumed (weights, optimizer, data positions, RNG and every
    # rank's carried memory restored): the same losses and weights as the straight run.
    two_processes("resumed", 3)
    two_processes("resumed", 6, "--resume", str(tmp_path / "resumed"))
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == straight
    # both ranks' rows are counted (as the single process's 8 rows), across the resume too
    single_tokens = [r["tokens"] for r in read_metrics(tmp_path / "single")]
    assert [r["tokens"] for r in read_metrics(tmp_path / "resumed")] == single_tokens
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # Each rank continues its own rows: one process cannot take over a two-process run.
    with pytest.raises(ConfigError, match="written by 2 process"):
        cli_main([*args, "--max-steps", "9", "--batch_size", "8", "--out", str(tmp_path / "one"),
                  "--resume", str(tmp_path / "resumed")])  # fmt: skip


def test_validation_runs_on_held_out_data(tmp_path):
    run = small_run([str(BOOKS / "pg35.txt")], cache_dir=str(tmp_path / "c"), max_steps=4,
                    eval_every=2, eval_batches=2)  # fmt: skip
    run.data.val = [str(BOOKS / "pg2500.txt")]
    summary = train(run, tmp_path / "run")
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert len(val) == 2 and all(0 < v < 10 for v in val), val
    assert summary["final_val_loss"] == val[-1]


def test_a_run_stopped_by_its_time_guard_is_validated_at_its_last_step(tmp_path):
    run = small_run([str(BOOKS / "pg35.txt")], cache_dir=str(tmp_path / "c"), max_steps=50,
                    eval_every=40, eval_batches=1, max_minutes=1e-9)  # fmt: skip
    run.data.val = [str(BOOKS / "pg2500.txt")]
    summary = train(run, tmp_path / "run")
    assert summary["steps"] == 1  # the guard is checked after every step
    val = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in val] == [1]
    assert summary["final_val_loss"] == val[-1]["val_loss"]
    assert (tmp_path / "run" / "final").is_dir()


def test_validation_runs_in_the_training_micro_batches(tmp_path):
    """Validation splits each batch like the training step (grad_accum): the full batch at once
    may not fit where training does; the loss is the same mean of micro-batch means."""
    from foldformer.data.tokenizers import load_tokenizer
    from foldformer.models import build_model
    from foldformer.train import validate

    torch.manual_seed(0)
    model = build_model("folded", {k: v for k, v in SMALL_MODEL.items() if k != "model_type"}
                        | {"vocab_size": 257})  # fmt: skip
    source_args = dict(tokenizer=load_tokenizer("bytes"), batch_size=4, seq_len=32, segment_len=8,
                       rank=0, world_size=1, seed=0, cache_dir=str(tmp_path / "c"))  # fmt: skip
    rows_seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    losses = {}
    for grad_accum in (1, 2, 4):
        cfg = load_run_config().train.replace(batch_size=4, grad_accum=grad_accum, eval_batches=3)
        rows_seen.clear()
        losses[grad_accum] = validate(model, [str(BOOKS / "pg2500.txt")], source_args, cfg,
                                      torch.device("cpu"), 1, True, {})  # fmt: skip
        assert rows_seen == [4 // grad_accum] * (3 * grad_accum)
    # Rows of a book are full (no padding), so every split averages the same tokens equally.
    assert losses[2] == pytest.approx(losses[1], rel=1e-6)
    assert losses[4] == pytest.approx(losses[1], rel=1e-6)


def test_full_attention_rows_keep_no_cache_between_micro_batches(tmp_path, monkeypatch):
    """A window longer than the row (full attention) makes rows independent: the state a row
    ends with is its whole key/value cache, which neither training nor validation may keep
    across micro-batches (the seed reference ran out of memory holding eight of them)."""
    import gc
    import weakref

    from foldformer.model import FoldedTransformer

    caches: list[weakref.ref] = []
    most_alive = []
    forward = FoldedTransformer.forward

    def counting_forward(self, *args, **kwargs):
        gc.collect()
        most_alive.append(sum(ref() is not None for ref in caches))
        out = forward(self, *args, **kwargs)
        caches.append(weakref.ref(out.memory.keys))
        return out

    monkeypatch.setattr(FoldedTransformer, "forward", counting_forward)
    run = small_run([str(BOOKS / "pg35.txt")], cache_dir=str(tmp_path / "c"), max_steps=2,
                    grad_accum=4, eval_every=2, eval_batches=1)  # fmt: skip
    run.model.update(segment_len=10**9, memory_len=0)
    run.data.val = [str(BOOKS / "pg2500.txt")]
    train(run, tmp_path / "run")
    assert len(most_alive) == 3 * 4  # two training steps and one validation batch
    assert max(most_alive) <= 1, most_alive  # only the previous micro-batch's `out`


def test_lr_schedule_warms_up_then_decays():
    cfg = load_run_config().train.replace(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_overrides_and_presets_are_checked():
    run = load_run_config(preset="tiny", overrides={"d_model": "64", "train.lr": "0.01"})
    assert run.model["d_model"] == 64 and run.train.lr == 0.01
    with pytest.raises(ConfigError, match="unknown option --d_modle"):
        load_run_config(overrides={"d_modle": "64"})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_run_config(preset="huge")
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by grad_accum=4"):
        load_run_config(overrides={"batch_size": "6", "grad_accum": "4"})


def test_seq_len_must_hold_whole_folds(tmp_path):
    run = small_run([str(BOOKS / "pg35.txt")], cache_dir=str(tmp_path / "c"), seq_len=30)
    with pytest.raises(ConfigError, match="seq_len=30 is not a multiple of segment_len=8"):
        train(run, tmp_path / "run")


def test_missing_data_is_named(tmp_path):
    run = small_run([str(tmp_path / "nope.txt")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train(run, tmp_path / "run")


def test_the_command_reports_input_mistakes_in_one_line(tmp_path, capsys, monkeypatch):
    from foldformer.cli import console

    monkeypatch.delenv("FOLDFORMER_DEBUG", raising=False)
    assert console(["train", "--batch_size", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == "foldformer: error: batch_size must be a positive integer, got 0\n"
    missing = tmp_path / "no_such_book.txt"
    assert console(["train", "--data", str(missing), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("foldformer: error:") and str(missing) in err and "Traceback" not in err
    monkeypatch.setenv("FOLDFORMER_DEBUG", "1")  # the traceback, for whoever wants it
    with pytest.raises(ConfigError):
        console(["train", "--batch_size", "0", "--out", str(tmp_path / "r")])


def test_progress_bar_counts_seconds_under_a_time_cap_and_steps_otherwise(tmp_path, capsys):
    """With max_minutes the run ends on time, not at max_steps=1,000,000 (the presets' "no step
    limit"): the bar counts seconds towards the cap and shows the step; without it, steps."""
    data = ["synthetic:recall?key_len=1&n_folds=2&max_folds=2"]
    common = dict(cache_dir=str(tmp_path / "c"), progress=True)
    train(small_run(data, max_steps=1_000_000, max_minutes=0.02, **common), tmp_path / "timed")
    timed = capsys.readouterr().err
    assert "1/1 s [" in timed, timed[-300:]  # seconds of the 1.2 s cap, not steps
    assert re.search(r"step=[1-9][\d,]*/1,000,000\]", timed), timed[-300:]
    train(small_run(data, max_steps=6, **common), tmp_path / "steps")
    steps = capsys.readouterr().err
    assert "6/6" in steps and "step=" not in steps
