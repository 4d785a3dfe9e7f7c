"""`foldformer generate`: text on stdout, same seed same text, states, one-line errors."""

from __future__ import annotations

import pytest
import torch

from foldformer.cli import console
from foldformer.data.tokenizers import ByteTokenizer
from foldformer.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = console(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_same_text_for_the_same_seed(tiny_checkpoint, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("The key is 4711. " * 30)
    question = ["--prompt", "The key is", "--max-new-tokens", 20, "--seed", 5]
    code, first, _ = run(capsys, tiny_checkpoint, "--context-file", book, *question)
    assert code == 0 and len(first) > 1
    assert run(capsys, tiny_checkpoint, "--context-file", book, *question)[1] == first
    other = run(capsys, tiny_checkpoint, "--context-file", book, *question[:-1], 6)[1]
    assert other != first
    # the context read once and saved answers the same as reading it again
    state = tmp_path / "book.state"
    assert run(capsys, tiny_checkpoint, "--context-file", book, "--state-out", state) == (0, "", "")
    assert run(capsys, tiny_checkpoint, "--state-in", state, *question)[1] == first
    prompt = tmp_path / "q.txt"
    prompt.write_text("The key is")
    code, text, _ = run(capsys, tiny_checkpoint, "--state-in", state, "--prompt-file", prompt,
                        *question[2:])  # fmt: skip
    assert text == first
    # a training run's folder works as well as its final model
    greedy = ["--prompt", "x", "--max-new-tokens", 5, "--temperature", 0]
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    for f in tiny_checkpoint.iterdir():
        (run_dir / "final" / f.name).write_bytes(f.read_bytes())
    assert run(capsys, run_dir, *greedy)[1] == run(capsys, tiny_checkpoint, *greedy)[1]


def test_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys):
    cases = [
        (["--prompt-file", tmp_path / "nope.txt"], "nope.txt"),
        (["--prompt", "x", "--context-file", tmp_path / "gone.txt"], "gone.txt"),
        (["--prompt", "x", "--temperature", -1], "temperature"),
        (["--prompt", "x", "--top-p", 2], "top_p"),
        (["--prompt", "x", "--state-in", tmp_path / "missing.state"], "missing.state"),
        ([], "--prompt"),
    ]
    for argv, named in cases:
        code, out, err = run(capsys, tiny_checkpoint, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1 and named in err, (argv, err)
    # a state saved for another model
    other = tmp_path / "other"
    torch.manual_seed(1)
    shape = dict(vocab_size=257, d_model=16, n_layers=2, n_heads=2, segment_len=8, memory_len=4)
    build_model("folded", shape).save_pretrained(other)
    ByteTokenizer().save(other)
    state = tmp_path / "s.state"
    run(capsys, other, "--prompt", "x", "--max-new-tokens", 1, "--state-out", state)
    code, out, err = run(capsys, tiny_checkpoint, "--prompt", "x", "--state-in", state)
    assert code == 2 and err.count("\n") == 1 and "another model" in err
    code, _, err = run(capsys, tmp_path / "no_model", "--prompt", "x")
    assert code == 2 and "no_model" in err and err.count("\n") == 1
