"""Bad input and damaged runs: each is one line naming the offending value, or behaves right.
docs/reliability.md lists every case with the test that checks it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foldformer.cli import console
from foldformer.config import ConfigError
from foldformer.train import load_run_config, train

BOOK = str(Path(__file__).resolve().parent / "fixtures" / "books" / "pg35.txt")
TINY = ["--d_model", "16", "--n_layers", "1", "--n_heads", "2", "--segment_len", "8",
        "--memory_len", "8", "--batch_size", "2", "--seq_len", "16", "--warmup_steps", "2",
        "--eval_every", "0", "--log_every", "1", "--progress", "false", "--device", "cpu"]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FOLDFORMER_DEBUG", raising=False)


def one_line_error(capsys, args: list[str]) -> str:
    assert console(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("foldformer: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--log_every", "0", "log_every must be a positive integer, got 0"),
        ("--save_every", "-1", "save_every must be an integer >= 0, got -1"),
        ("--eval_every", "-5", "eval_every must be an integer >= 0, got -5"),
        ("--bptt", "-2", "bptt must be an integer >= 0, got -2"),
        ("--keep_checkpoints", "-1", "keep_checkpoints must be an integer >= 0, got -1"),
        ("--warmup_steps", "-1", "warmup_steps must be an integer >= 0, got -1"),
        ("--min_lr_ratio", "5", "min_lr_ratio must be in [0, 1], got 5.0"),
        ("--weight_decay", "-0.1", "weight_decay must be in [0, inf], got -0.1"),
        ("--beta2", "1.5", "beta2 must be in [0, 1), got 1.5"),
        ("--beta1", "1", "beta1 must be in [0, 1), got 1.0"),
        ("--lr", "abc", "train.lr='abc' is not a finite float"),
        ("--lr", "nan", "train.lr='nan' is not a finite float"),
        ("--seed", "abc", "train.seed='abc' is not an int"),
        ("--batch_size", "1.5", "train.batch_size='1.5' is not an int"),
        ("--progress", "maybe", "train.progress='maybe' is not a bool"),
        ("--memory_gate", "2", "model.memory_gate='2' is not a bool"),
        ("--device", "gpu", "device='gpu' is not a device"),
        ("--device", "cuda:99", "device='cuda:99'"),
        ("--train.lr", "x", "train.lr='x' is not a finite float"),
        ("--d_modle", "64", "unknown option --d_modle"),
        ("--model.d_modle", "64", "unknown FoldedConfig field(s) ['d_modle']"),
        ("--precision", "fp16", "precision='fp16' is not one of auto, fp32, bf16"),
        ("--max_minutes", "-1", "max_minutes must be in [0, inf], got -1.0"),
        ("--grad_clip", "-1", "grad_clip must be in [0, inf], got -1.0"),
    ],
)
def test_a_bad_value_is_one_line_naming_it(tmp_path, capsys, option, value, message):
    err = one_line_error(capsys, ["train", "--data", BOOK, "--out", str(tmp_path), option, value])
    assert message in err


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "synthetic:passkey?mix=2",
            "data spec synthetic:passkey: curriculum mix must be in [0, 1)",
        ),
        ("synthetic:passkey?uniform=yes", "uniform must be true or false, got 'yes'"),
        ("synthetic:recall?key_len=0", "data spec synthetic:recall:"),
    ],
)
def test_a_bad_task_option_value_is_one_line_naming_the_task(tmp_path, capsys, spec, message):
    err = one_line_error(capsys, ["train", "--data", spec, "--out", str(tmp_path)])
    assert message in err


def test_values_are_parsed_by_type():
    run = load_run_config(overrides={"progress": "no", "memory_gate": "0", "compile": "yes",
                                     "lr": "3e-4", "d_ff": "none", "train": "a.txt,b.txt"})  # fmt: skip
    assert run.train.progress is False and run.train.compile is True and run.train.lr == 3e-4
    assert run.model["memory_gate"] is False and run.model["d_ff"] is None
    assert run.data.train == ["a.txt", "b.txt"]
    with pytest.raises(ConfigError, match=r"train.max_steps=True is not an int"):
        load_run_config(overrides={"max_steps": True})


def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_error(
        capsys, ["train", "--data", BOOK, "--out", str(tmp_path), "--device", "cuda"]
    )
    assert "device='cuda': this machine has no CUDA device" in err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.toml", "[train]\nlr = = 1\n", "bad.toml is not valid TOML"),
        ("bad.json", '{"train": {"lr": }', "bad.json is not valid JSON"),
        ("flat.toml", "lr = 1\n", "[lr] in"),
        ("typed.toml", "[train]\nlr = 'fast'\n", "train.lr='fast' is not a finite float"),
        ("gate.toml", "[model]\nmemory_gate = 0\n[train]\nseq_len = 'x'\n", "train.seq_len='x'"),
    ],
)
def test_a_bad_config_file_is_one_line(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    err = one_line_error(capsys, ["train", str(tmp_path / name), "--out", str(tmp_path / "r")])
    assert message in err


def test_compare_reads_its_config_file_the_same_way(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[train]\nlr = = 1\n")
    err = one_line_error(capsys, ["compare", str(tmp_path / "bad.toml"), "--out", str(tmp_path)])
    assert "bad.toml is not valid TOML" in err


def test_an_option_without_its_value_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--out", str(tmp_path), "--train.lr"])
    assert "option --train.lr needs a value" in err


def test_an_unwritable_out_is_found_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    # no --data: the first check to fail would be "no training data" were --out not first
    err = one_line_error(capsys, ["train", "--out", str(tmp_path / "file" / "run")])
    assert f"--out {tmp_path / 'file' / 'run'} is not a writable folder" in err


def test_report_on_a_run_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "folded"}))
    err = one_line_error(capsys, ["report", str(tmp_path)])
    assert "config.json" in err


def test_resume_of_nothing_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--data", BOOK, "--out", str(tmp_path / "r"),
                                  "--resume", str(tmp_path / "none")])  # fmt: skip
    assert "no such run or checkpoint folder" in err


# ---------------------------------------------------------------------------------------------
# Resume: which checkpoint, and what it may change
# ---------------------------------------------------------------------------------------------


def run_cli(out: Path, *extra: str, steps: int = 4) -> int:
    args = ["train", "--data", BOOK, *TINY, "--cache_dir", str(out.parent / "cache"),
            "--out", str(out), "--max-steps", str(steps), "--save_every", "2", *extra]  # fmt: skip
    return console(args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Four steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert run_cli(out) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_resume_takes_the_newest_complete_checkpoint_and_removes_stale_ones(
    finished_run, tmp_path, capsys
):
    out = copy_run(finished_run, tmp_path)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000005.tmp")  # a kill
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000006")
    (checkpoints / "step_00000006" / "complete.json").unlink()  # copied, say, but not whole
    assert run_cli(out, "--resume", str(out), steps=6) == 0
    assert f"resumed from {checkpoints / 'step_00000004'} at step 4" in capsys.readouterr().out
    assert not (checkpoints / "step_00000005.tmp").exists()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


@pytest.mark.parametrize("part", ["stream_memory.safetensors", "optimizer.pt", "rng.safetensors"])
def test_resume_refuses_a_checkpoint_with_a_missing_part(finished_run, tmp_path, capsys, part):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "step_00000004" / part).unlink()
    assert run_cli(out, "--resume", str(out), steps=6) == 2
    assert f"step_00000004: the checkpoint has no {part}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (["--seq_len", "32"], "train.seq_len 16 -> 32"),
        (["--batch_size", "4"], "train.batch_size 2 -> 4"),
        (["--d_model", "32"], "model.d_model 16 -> 32"),
        (["--data", BOOK, BOOK], "data.train"),
    ],
)
def test_resume_refuses_another_shape_or_data(finished_run, tmp_path, capsys, change, message):
    out = copy_run(finished_run, tmp_path)
    assert run_cli(out, "--resume", str(out), *change, steps=6) == 2
    err = capsys.readouterr().err
    assert message in err and "start a new run" in err
    assert "Traceback" not in err


def test_resume_changes_hyperparameters_only_when_allowed_and_records_them(
    finished_run, tmp_path, capsys
):
    out = copy_run(finished_run, tmp_path)
    before = (out / "run_config.json").read_text()
    assert run_cli(out, "--resume", str(out), "--lr", "0.01", steps=6) == 2
    assert "train.lr 0.001 -> 0.01 differ" in capsys.readouterr().err
    assert (out / "run_config.json").read_text() == before  # nothing recorded: nothing ran
    assert run_cli(out, "--resume", str(out), "--lr", "0.01", "--allow-config-change", steps=6) == 0
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["train"]["lr"] == 0.01
    assert recorded["resumes"] == [{"step": 4, "checkpoint": str(out / "checkpoints" / "step_00000004"),
                                    "changed": {"train.lr": [0.001, 0.01]}}]  # fmt: skip
    from foldformer.train import lr_factor

    cfg = load_run_config(overrides={"lr": "0.01", "warmup_steps": "2", "max_steps": "6"}).train
    metrics = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").open())}
    assert metrics[5]["lr"] == pytest.approx(0.01 * lr_factor(5, cfg))  # the new peak


def test_a_checkpoint_written_before_complete_json_resumes_when_named(finished_run, tmp_path):
    """Checkpoints of 4ef0180 and before: no complete.json, no run config in trainer_state."""
    out = copy_run(finished_run, tmp_path)
    old = out / "checkpoints" / "step_00000004"
    (old / "complete.json").unlink()
    state = json.loads((old / "trainer_state.json").read_text())
    del state["run"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert run_cli(out, "--resume", str(old), steps=6) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_a_resume_may_run_longer(finished_run, tmp_path):
    """max_steps, validation, saving and logging are not hyper-parameters of the weights."""
    out = copy_run(finished_run, tmp_path)
    assert run_cli(out, "--resume", str(out), "--log_every", "2", "--keep_checkpoints", "1",
                   steps=8) == 0  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000008"]


def test_train_from_python_refuses_bad_values():
    with pytest.raises(ConfigError, match="log_every must be a positive integer"):
        load_run_config().train.replace(log_every=0)
    with pytest.raises(ConfigError, match="device='tpu' is not a device"):
        load_run_config().train.replace(device="tpu")


def test_a_kill_during_tokenizing_leaves_no_temporary_folder(tmp_path):
    """A build killed half-way leaves .KEY.tmp-HOST-PID-*; the next build removes it once that
    process is gone, and leaves a live build's folder alone."""
    import socket

    from foldformer.data.cache import tokenize_corpus
    from foldformer.data.tokenizers import ByteTokenizer

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    stale = tmp_path / f".0123abcd.tmp-{host}-{int(gone.stdout)}-x1y2"
    live = tmp_path / f".0123abcd.tmp-{host}-{os.getpid()}-z3"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "tokens.bin").write_bytes(b"\0" * 8)
    corpus = tokenize_corpus([BOOK], ByteTokenizer(), tmp_path, progress=False)
    assert len(corpus) == 1 and len(corpus.tokens) > 0
    assert not stale.exists() and live.exists()


def test_train_accepts_a_python_run(tmp_path):
    """The Python API: a RunConfig built in code trains (and is checked) like the command."""
    run = load_run_config(overrides={"d_model": 16, "n_layers": 1, "n_heads": 2, "batch_size": 2,
                                     "seq_len": 16, "max_steps": 2, "progress": False,
                                     "eval_every": 0, "device": "cpu"})  # fmt: skip
    run.data.train, run.data.cache_dir = [BOOK], str(tmp_path / "c")
    assert train(run, tmp_path / "r")["steps"] == 2


def test_a_run_resumes_under_another_attention_kernel(tmp_path):
    """The kernel is how a model computes, not what: a run trained with attention='eager'
    resumes under the default, and a run's identity (context-state fingerprint) ignores it."""
    from foldformer.generate import model_fingerprint
    from foldformer.models import load_model

    out = tmp_path / "run"
    assert run_cli(out, "--attention", "eager") == 0
    assert run_cli(out, "--resume", str(out), steps=6) == 0
    model = load_model(out / "final")
    eager = model_fingerprint(model)
    model.config.attention = "sdpa"
    assert model_fingerprint(model) == eager


def test_flex_attention_on_a_cpu_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--data", BOOK, *TINY, "--attention", "flex",
                                  "--out", str(tmp_path / "run"), "--max-steps", "1"])  # fmt: skip
    assert "attention='flex' cannot train on the CPU" in err


def test_generate_and_serve_on_a_missing_device_are_one_line(finished_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["generate", str(finished_run / "final"), "--prompt", "hi", "--device", "cuda"],
                 ["serve", str(finished_run / "final"), "--device", "cuda"]):  # fmt: skip
        assert "this machine has no CUDA device" in one_line_error(capsys, args)


def test_an_unwritable_eval_out_is_found_before_the_evaluation(finished_run, capsys):
    err = one_line_error(capsys, ["eval", "passkey", str(finished_run / "final"),
                                  "--lengths", "300", "--out", BOOK])  # fmt: skip
    assert "is not a writable folder" in err
