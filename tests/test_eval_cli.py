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


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    """`eval ecl` reads through the trainer's token cache: keep it out of the home folder."""
    monkeypatch.setattr("foldformer.data.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")


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
    # --exact: every prompt exactly its length, the same questions and answers
    run("eval", "babilong", workspace / "ckpt", "--task", "qa1", "--lengths", "300", "--books",
        workspace / "books", "--babi", workspace, "--samples", 2, "--out", out / "exact",
        "--device", "cpu", "--exact")  # fmt: skip
    (exact,) = records_of(out / "exact" / "babilong_qa1.json", "babilong_accuracy")
    assert exact["extra"]["mean_prompt_tokens"] == 300 and exact["config"]["eval"]["exact"]
    answers = [e["answer"] for e in exact["extra"]["examples"]]
    assert answers == [e["answer"] for e in cells[1]["extra"]["examples"]]
    # --facts-within: recorded, the same questions
    run("eval", "babilong", workspace / "ckpt", "--task", "qa1", "--lengths", "300", "--books",
        workspace / "books", "--babi", workspace, "--samples", 2, "--out", out / "near",
        "--device", "cpu", "--exact", "--facts-within", "64", "--facts-at", "start")  # fmt: skip
    (near,) = records_of(out / "near" / "babilong_qa1.json", "babilong_accuracy")
    assert (near["config"]["eval"]["facts_within"], near["config"]["eval"]["facts_at"]) == (
        64,
        "start",
    )
    assert [e["answer"] for e in near["extra"]["examples"]] == answers


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


def test_eval_and_compare_give_one_answer_on_one_checkpoint(workspace):
    """`eval ecl` / `eval lm` and compare's evaluation are one suite: the same settings and
    documents give the same records on one checkpoint."""
    from foldformer.compare import evaluate_model
    from foldformer.evaluate.suite import EvalSettings, HeldOutDocuments

    ckpt, books, out = workspace / "ckpt", workspace / "books", workspace / "out_same"
    run("eval", "ecl", ckpt, "--data", books, "--targets", 8, "--max-distance", 32,
        "--bootstrap", 50, "--control", "--out", out, "--device", "cpu")  # fmt: skip
    run("eval", "lm", ckpt, "--data", books, "--max-tokens", 100, "--out", out, "--device", "cpu")
    settings = EvalSettings(run=["ecl", "lm"], ecl_targets=8, ecl_max_distance=32,
                            ecl_bootstrap=50, ecl_control=True, lm_max_tokens=100)  # fmt: skip
    documents = HeldOutDocuments([str(books)], ByteTokenizer(), progress=False)
    suite = evaluate_model("ckpt", ckpt, settings, documents, torch.device("cpu"), False)
    from_cli = load_records([out / "ecl.json", out / "lm.json"])
    assert [r["metric"] for r in suite] == [r["metric"] for r in from_cli]
    for a, b in zip(suite, from_cli, strict=True):
        assert (a["value"], a["interval"]) == (b["value"], b["interval"]), a["metric"]
        assert a["config"]["eval"] == b["config"]["eval"]


def fails_in_one_line(capsys, *argv) -> str:
    """The command exits 2 with a one-line error (no traceback; progress bars may precede it);
    returns that line."""
    from foldformer.cli import console

    capsys.readouterr()
    assert console([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("foldformer: error: ") == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("foldformer: error: "), err
    return line


ECL = ("eval", "ecl", "{ckpt}", "--data", "{books}", "--device", "cpu", "--max-distance", 64)
PASSKEY = ("eval", "passkey", "{ckpt}", "--device", "cpu", "--samples", 1, "--depths", 0.5)
LM = ("eval", "lm", "{ckpt}", "--data", "{books}", "--device", "cpu")
BABILONG = ("eval", "babilong", "{ckpt}", "--device", "cpu", "--books", "{books}", "--babi",
            "{root}/qa1_single-supporting-fact_train.txt", "--lengths", 0)  # fmt: skip
BENCH = ("bench", "memory", "--device", "cpu", "--d-model", 32, "--layers", 1, "--lengths", 64)
BAD_INPUTS = {
    "ecl_max_distance_1M": (ECL + ("--max-distance", "1M"), "maximum distance 1M plus the 64"),
    "ecl_max_distance_abc": (ECL + ("--max-distance", "abc"), "--max-distance 'abc'"),
    "ecl_device_gpu": (ECL + ("--device", "gpu"), "--device 'gpu' is not a device"),
    "ecl_targets_1": (ECL + ("--targets", 1), "--targets 1: must be >= 2"),
    "ecl_targets_negative": (ECL + ("--targets", -3), "--targets -3"),
    "ecl_targets_too_many": (ECL + ("--targets", 10**5), "100000 asked for"),
    "ecl_unit_negative": (ECL + ("--unit", -4), "--unit -4"),
    "ecl_unit_above_distance": (ECL + ("--unit", 128), "below the grid unit 128"),
    "ecl_batch_size_0": (ECL + ("--batch-size", 0), "--batch-size 0"),
    "ecl_bootstrap_0": (ECL + ("--bootstrap", 0), "--bootstrap 0"),
    "passkey_lengths_1Q": (PASSKEY + ("--lengths", "1Q"), "--lengths '1Q'"),
    "passkey_lengths_0": (PASSKEY + ("--lengths", 0), "--lengths [0]"),
    "passkey_length_too_short": (PASSKEY + ("--lengths", 8), "passkey length 8"),
    "passkey_lengths_empty": (PASSKEY + ("--lengths", ","), "--lengths ','"),
    "passkey_samples_0": (PASSKEY + ("--samples", 0), "--samples 0"),
    "passkey_depths_2": (PASSKEY + ("--depths", 2), "--depths [2.0]"),
    "passkey_depths_abc": (PASSKEY + ("--depths", "abc"), "--depths 'abc'"),
    "passkey_batch_size_0": (PASSKEY + ("--batch-size", 0), "--batch-size 0"),
    "lm_max_tokens_negative": (LM + ("--max-tokens", -5), "--max-tokens -5"),
    "lm_max_documents_negative": (LM + ("--max-documents", -1), "--max-documents -1"),
    "babilong_samples_0": (BABILONG + ("--samples", 0), "--samples 0: must be >= 1"),
    "babilong_batch_size_0": (BABILONG + ("--batch-size", 0), "--batch-size 0: must be >= 1"),
    "babilong_lengths_1Q": (BABILONG + ("--lengths", "1Q"), "--lengths '1Q'"),
    "babilong_samples_too_many": (BABILONG + ("--samples", 1000), "the bAbI split has only"),
    "babilong_facts_within_abc": (BABILONG + ("--facts-within", "abc"), "--facts-within 'abc'"),
    "babilong_facts_within_negative": (BABILONG + ("--facts-within", "-8"), "--facts-within '-8'"),
    "bench_lengths_0": (BENCH + ("--lengths", 0), "--lengths [0]"),
    "bench_batch_size_0": (BENCH + ("--batch-size", 0), "--batch-size 0"),
    "bench_unknown_model": (BENCH + ("--models", "nomodel"), "--models 'nomodel'"),
    "report_not_json": (("report", "{books}/a.txt"), "a.txt is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_eval_input_is_one_line_naming_the_value(workspace, capsys, tmp_path, case):
    argv, message = BAD_INPUTS[case]
    paths = {"ckpt": workspace / "ckpt", "books": workspace / "books", "root": workspace}
    argv = [str(a).format(**paths) for a in argv] + ["--out", str(tmp_path)] * (argv[0] != "report")
    assert message in fails_in_one_line(capsys, *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_is_one_line(workspace, capsys, tmp_path):
    for argv in (("eval", "lm", workspace / "ckpt", "--data", workspace / "books"),
                 ("bench", "memory", "--lengths", 64)):  # fmt: skip
        line = fails_in_one_line(capsys, *argv, "--device", "cuda", "--out", tmp_path)
        assert "--device 'cuda': this machine has no CUDA device" in line


def test_plot_babilong_at_0_and_100_percent(tmp_path):
    # a Wilson bound a rounding error inside 0% or 100% once made matplotlib refuse the plot
    from foldformer.evaluate.babilong import BabilongCell, plot_babilong

    cells = [BabilongCell(n, correct, 4, float(n), []) for n, correct in ((0, 4), (1024, 0))]
    assert plot_babilong(cells, tmp_path / "b.png").stat().st_size > 0
