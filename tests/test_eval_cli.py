"""Every evaluation command runs on a tiny checkpoint and writes valid JSON records (and a PNG)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.cli import main
from foldformer.data.tokenizers import ByteTokenizer
from foldformer.evaluate.flops import model_flops_per_token
from foldformer.evaluate.lm import evaluate_lm
from foldformer.evaluate.records import load_records

BOOK = " ".join(
    f"Chapter {i}. The traveller walked along the river for {i} days. "
    f"He saw a heron, a mill and a bridge. Nobody knew where the road would end."
    for i in range(60)
)
BABI = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary?\tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel?\thallway\t4
1 John moved to the kitchen.
2 Sandra went to the office.
3 Where is John?\tkitchen\t1
1 Mary went to the garden.
2 Where is Mary?\tgarden\t1
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a busy 2-core machine is not oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = FoldedConfig(
        vocab_size=257, d_model=32, n_layers=2, n_heads=2, segment_len=8, memory_len=8
    )
    FoldedTransformer(config).save_pretrained(root / "ckpt")
    ByteTokenizer().save(root / "ckpt")
    (root / "books").mkdir()
    (root / "books" / "a.txt").write_text(BOOK)
    (root / "books" / "b.txt").write_text(BOOK.replace("heron", "swan"))
    (root / "qa1_single-supporting-fact_train.txt").write_text(BABI * 10)
    return root


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def records_of(path, metric):
    records = load_records([path])
    assert records, f"no records in {path}"
    return [r for r in records if r["metric"] == metric]


def test_eval_ecl_command(workspace, capsys):
    out = workspace / "out_ecl"
    run(
        "eval",
        "ecl",
        workspace / "ckpt",
        "--data",
        workspace / "books",
        "--targets",
        24,
        "--max-distance",
        64,
        "--bootstrap",
        200,
        "--out",
        out,
        "--device",
        "cpu",
    )
    [ecl] = records_of(out / "ecl.json", "ecl")
    assert ecl["value"] in (0, 8, 16, 32, 64)
    assert [p["distance"] for p in ecl["extra"]["curve"]] == [0, 8, 16, 32, 64]
    assert len(records_of(out / "ecl.json", "loss_at_context")) == 5
    assert (out / "ecl.png").stat().st_size > 0
    assert "ECL =" in capsys.readouterr().out


def test_eval_passkey_command_accepts_human_sizes(workspace):
    out = workspace / "out_passkey"
    run(
        "eval",
        "passkey",
        workspace / "ckpt",
        "--lengths",
        "0.125K,256",
        "--depths",
        "0,1",
        "--samples",
        2,
        "--out",
        out,
        "--device",
        "cpu",
    )
    cells = records_of(out / "passkey.json", "passkey_accuracy")
    assert {(r["config"]["eval"]["length"], r["config"]["eval"]["depth"]) for r in cells} == {
        (128, 0.0),
        (128, 1.0),
        (256, 0.0),
        (256, 1.0),
    }
    assert (out / "passkey.png").stat().st_size > 0


def test_eval_babilong_command(workspace):
    out = workspace / "out_babilong"
    run(
        "eval",
        "babilong",
        workspace / "ckpt",
        "--task",
        "qa1",
        "--lengths",
        "0,300",
        "--books",
        workspace / "books",
        "--babi",
        workspace,
        "--samples",
        2,
        "--out",
        out,
        "--device",
        "cpu",
    )
    cells = records_of(out / "babilong_qa1.json", "babilong_accuracy")
    assert [r["config"]["eval"]["length"] for r in cells] == [0, 300]
    assert all(r["extra"]["samples"] == 2 for r in cells)
    assert cells[1]["extra"]["mean_prompt_tokens"] > cells[0]["extra"]["mean_prompt_tokens"]
    assert (out / "babilong_qa1.png").stat().st_size > 0


def test_eval_lm_command_and_bits_per_byte_definition(workspace):
    out = workspace / "out_lm"
    run(
        "eval",
        "lm",
        workspace / "ckpt",
        "--data",
        workspace / "books",
        "--max-tokens",
        400,
        "--out",
        out,
        "--device",
        "cpu",
    )
    [bpb] = records_of(out / "lm.json", "bits_per_byte")
    [loss] = records_of(out / "lm.json", "loss_per_token")
    # bytes: one predicted token is one byte, and 399 of each document's 400 are predicted
    assert bpb["extra"]["bytes"] == bpb["extra"]["tokens"] == 2 * 399
    assert bpb["value"] == pytest.approx(loss["value"] / math.log(2))
    by_position = bpb["extra"]["loss_by_position_in_fold"]
    assert [p["position"] for p in by_position] == list(range(8))
    assert sum(f["count"] for f in bpb["extra"]["loss_by_fold_index"]) == 2 * 399
    assert (out / "lm.png").stat().st_size > 0


def test_lm_loss_equals_one_call_loss():
    torch.manual_seed(0)
    model = FoldedTransformer(
        FoldedConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, segment_len=8, memory_len=4)
    ).eval()
    text = BOOK[:300]
    result = evaluate_lm(model, ByteTokenizer(), [("doc", text)], chunk_size=13, progress=False)
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        expected = model(ids[:, :-1], labels=ids[:, 1:]).loss.item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2), rel=1e-5)


def test_bench_memory_on_cpu_and_report(workspace, capsys):
    out = workspace / "out_memory"
    run(
        "bench",
        "memory",
        "--lengths",
        "64,256",
        "--d-model",
        32,
        "--layers",
        1,
        "--window",
        16,
        "--memory",
        16,
        "--out",
        out,
        "--device",
        "cpu",
    )
    memory = records_of(out / "memory.json", "peak_memory_mib")
    speed = records_of(out / "memory.json", "tokens_per_second")
    keys = {
        (r["config"]["name"], r["config"]["eval"]["mode"], r["config"]["eval"]["length"])
        for r in memory
    }
    assert keys == {
        (m, mode, t)
        for m in ("folded", "full-attention")
        for mode in ("inference", "training")
        for t in (64, 256)
    }
    assert all(r["value"] > 0 for r in memory) and all(r["value"] > 0 for r in speed)
    assert (out / "memory.png").stat().st_size > 0
    # the report turns every result folder into one Markdown table
    capsys.readouterr()
    run("report", workspace / "out_memory", "--metric", "tokens_per_second")
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| metric | value |") and len(table) == 2 + len(speed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_isolated_memory_point_measures_its_own_peak():
    """`bench memory --isolate` runs each point in a subprocess; Linux keeps the launching
    process's RSS high-water mark across fork and exec in ru_maxrss, so the point must read
    its own (VmHWM), not report the size of whatever launched it."""
    from foldformer.evaluate.memory import _point_in_subprocess, _status_kib, model_specs

    ballast = torch.ones(100_000_000)  # 400 MB resident in this, the launching, process
    ballast += 1
    spec = model_specs(["folded"], d_model=32, n_layers=1, window=8, memory=8)[0]
    point = _point_in_subprocess(spec, "inference", 64, 1)
    launcher = _status_kib("VmRSS") * 1024
    assert 0 < point["baseline_bytes"] <= point["peak_bytes"] < launcher - 300 * 2**20, (
        point, launcher)  # fmt: skip
    del ballast


def test_mfu_convention_flops():
    """One convention (foldformer.evaluate.flops): 6·N·(m+w)/w + 12·L·d·(m+w)²/w + 6·d·V per new
    training token, a third of each for inference, w = min(w, T)."""
    model = FoldedTransformer(
        FoldedConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, segment_len=8, memory_len=8)
    )
    n = model.num_parameters(non_embedding=True)
    attention = 4 * 2 * 32 * 16 * 16 / 8
    head = 2 * 32 * 257
    assert model_flops_per_token(model, True, 1024) == pytest.approx(
        3 * (2 * n * 2 + attention + head)
    )
    assert model_flops_per_token(model, False, 1024) == pytest.approx(2 * n * 2 + attention + head)
    full = FoldedTransformer(model.config.replace(segment_len=10**9, memory_len=0))
    # full attention over T: one fold of w = T positions, m = 0
    n_full = full.num_parameters(non_embedding=True)  # no initial memory rows
    assert model_flops_per_token(full, False, 100) == pytest.approx(
        2 * n_full + 4 * 2 * 32 * 100 + head
    )
    with pytest.raises(ValueError, match="length >= 1"):
        model_flops_per_token(model, False, 0)
