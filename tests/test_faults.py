"""Fault injection: a run killed (SIGKILL) at random moments, once inside a checkpoint write, or
interrupted (SIGINT, Ctrl-C), and resumed each time, ends bit-identical to a run never stopped:
the same weights and the same metrics.jsonl, each step once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from foldformer.train.checkpoint import checkpoint_dirs

BOOK = str(Path(__file__).resolve().parent / "fixtures" / "books" / "pg35.txt")
STEPS, SAVE_EVERY = 30, 4


def command(out: Path, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "foldformer.cli", "train", "--data", BOOK,
            "--d_model", "16", "--n_layers", "1", "--n_heads", "2", "--segment_len", "8",
            "--memory_len", "8", "--dropout", "0.1", "--batch_size", "2", "--seq_len", "16",
            "--warmup_steps", "2", "--eval_every", "0", "--log_every", "1",
            "--save_every", str(SAVE_EVERY), "--progress", "false", "--device", "cpu",
            "--cache_dir", str(out.parent / "cache"), "--max-steps", str(STEPS), "--out", str(out)]  # fmt: skip
    # a run killed before its first checkpoint starts again from scratch
    return args + (["--resume", str(out)] if resume and checkpoint_dirs(out) else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def start(out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command(out, resume=True), env={**ENV, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, json.JSONDecodeError):  # not yet written, or a line being written
        return 0


def stop_at(process: subprocess.Popen, out: Path, step: int, sig: int, rng: random.Random):
    """Send `sig` once the run has logged `step` (plus a random few milliseconds)."""
    while process.poll() is None and logged_step(out) < step:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.03))
    if process.poll() is None:
        process.send_signal(sig)
    return process.communicate(timeout=120)


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "straight"
    subprocess.run(command(out, resume=False), env=ENV, check=True, capture_output=True)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)  # every step once, with the same loss
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_sigkill_at_random_moments_and_inside_a_save(straight, tmp_path):
    out, rng = tmp_path / "killed", random.Random(12)
    # inside the write of step 8 (the FOLDFORMER_TEST_KILL_IN_SAVE hook), then at random steps
    process = start(out, FOLDFORMER_TEST_KILL_IN_SAVE="8")
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step_00000008.tmp").is_dir()  # the half-written checkpoint
    for step in sorted(rng.sample(range(9, STEPS - 5), 3)):
        process = start(out)
        stop_at(process, out, step, signal.SIGKILL, rng)
    process = start(out)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert_same_run(straight, out)


def test_sigint_saves_the_last_finished_step_and_resumes_exactly(straight, tmp_path):
    out, rng = tmp_path / "interrupted", random.Random(3)
    for step in (3, 13):
        process = start(out)
        _, err = stop_at(process, out, step, signal.SIGINT, rng)
        assert process.returncode == 130, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        saved = checkpoint_dirs(out)[-1]
        assert int(saved.name[5:]) >= step
        assert last == (f"foldformer: interrupted at step {int(saved.name[5:])}, saved in "
                        f"{out}/checkpoints: continue with --resume {out}")  # fmt: skip
        assert json.loads((saved / "trainer_state.json").read_text())["step"] == logged_step(out)
    process = start(out)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert_same_run(straight, out)
