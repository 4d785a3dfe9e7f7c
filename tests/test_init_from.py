"""`foldformer train --init-from DIR`: a new run (new data, fresh optimizer) from the weights,
model config and tokenizer of a foldformer or Hugging Face model folder; what cannot be mapped
is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from foldformer.cli import console
from foldformer.config import ConfigError
from foldformer.train import Trainer, load_run_config, train

pytestmark = pytest.mark.usefixtures("one_thread")

BOOKS = Path(__file__).resolve().parent / "fixtures" / "books"
SHAPE = dict(d_model=32, n_layers=2, n_heads=2, segment_len=8, memory_len=8)
STEPS = dict(batch_size=4, seq_len=32, lr=3e-3, warmup_steps=5, eval_every=0, save_every=0,
             log_every=1, progress=False)  # fmt: skip


def run_config(book: str, cache: Path, model: dict | None = None, **train_values):
    run = load_run_config()
    run.model.update(model or {})
    run.data.train, run.data.cache_dir = [str(BOOKS / book)], str(cache)
    run.train = run.train.replace(**{**STEPS, **train_values})
    return run


def first_losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run trained on one book: its folder."""
    root = tmp_path_factory.mktemp("source")
    train(run_config("pg35.txt", root / "c", SHAPE, max_steps=40), root / "run")
    return root / "run"


def test_a_fine_tune_starts_at_the_sources_loss_not_at_random_inits(source, tmp_path):
    summary_source = json.loads((source / "summary.json").read_text())
    train(
        run_config("pg84.txt", tmp_path / "c", init_from=str(source), max_steps=3), tmp_path / "ft"
    )
    train(run_config("pg84.txt", tmp_path / "c", SHAPE, max_steps=3), tmp_path / "fresh")
    tuned, fresh = first_losses(tmp_path / "ft")[0], first_losses(tmp_path / "fresh")[0]
    assert fresh > 5.0  # random init: about ln 257
    assert tuned < summary_source["final_train_loss"] + 0.5 < fresh - 1.0, (tuned, fresh)
    saved = json.loads((tmp_path / "ft" / "run_config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["train"]["init_from"] == str(source)


def test_weights_come_from_a_foldformer_or_hugging_face_folder(source, tmp_path):
    from foldformer.hf import FoldedForCausalLM

    hf = tmp_path / "hf"
    FoldedForCausalLM.from_pretrained(source / "final").save_pretrained(hf)  # no tokenizer
    expected = load_file(str(source / "final" / "model.safetensors"))
    for folder in (source / "final", hf):
        run = run_config("pg84.txt", tmp_path / "c", {"segment_len": 16}, init_from=str(folder))
        trainer = Trainer(run, tmp_path / folder.name)
        state = trainer.model.state_dict()
        assert all(torch.equal(state[k], t) for k, t in expected.items())
        assert trainer.model.config.segment_len == 16  # a field a fine-tune may change
        assert trainer.step == 0 and not trainer.optimizer.state  # a fresh optimizer


def test_what_cannot_be_mapped_is_refused_by_name(source, tmp_path):
    cases = [
        ({"d_model": 64}, {}, "d_model 32 -> 64"),
        ({"memory_len": 4}, {}, "initial_memory (8, 32) in the source, (4, 32) here"),
        ({"model_type": "rmt"}, {}, "holds a 'folded' model"),
        ({}, {"init_from": str(tmp_path / "nowhere")}, "nowhere: not a model folder"),
    ]
    for model, values, message in cases:
        run = run_config("pg84.txt", tmp_path / "c", model, **{"init_from": str(source), **values})
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Trainer(run, tmp_path / "refused")


def test_the_command_hints_init_from_for_a_resume_of_a_model_folder(source, tmp_path, capsys):
    final = source / "final"
    out = str(tmp_path / "r")
    assert (
        console(["train", "--data", str(BOOKS / "pg84.txt"), "--out", out, "--resume", str(final)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"use --init-from {final}" in err
    args = ["train", "--data", str(BOOKS / "pg84.txt"), "--out", out, "--init-from", str(final)]
    assert console([*args, "--n_layers", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_layers 2 -> 3" in err
