"""The benchmark scripts run end to end on a CPU and report what they measured.

benchmarks/throughput.py runs in-process (--quick: tiny shapes, no compile on a CPU);
benchmarks/scaling.sh --quick trains with two gloo processes under torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return load("throughput")


def assert_measured(row: dict) -> None:
    assert "error" not in row and "skipped" not in row, row
    assert row["tokens_per_s"] > 0, row
    assert math.isfinite(row["mfu"]) and row["mfu"] > 0, row


def test_bench_memory_and_throughput_count_flops_alike(throughput):
    """One FLOP convention: `bench memory` (and so compare) and benchmarks/throughput.py give
    the same FLOPs per token, and so the same MFU, for one model and length."""
    from foldformer import FoldedConfig
    from foldformer.evaluate import memory

    config = FoldedConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=1, segment_len=8,
                          memory_len=8)  # fmt: skip
    row = throughput.bench_training(config, 2, 64, "none", True, steps=1, rate=1e12, warmup=0)
    spec = memory.model_specs(["folded"], 32, 1, 8, 8)[0]
    (point,) = memory.bench_memory([spec], [64], ["training"], 2, "cpu", progress=False)
    assert point["model_config"]["non_embedding_parameters"] == row["non_embedding_parameters"]
    assert point["flops_per_token"] == pytest.approx(row["mfu"] * 1e12 / row["tokens_per_s"])


def test_training_rows_time_the_products_own_step(throughput, monkeypatch):
    """A training row runs Trainer.train_step itself (clipping, schedule, reset mask, carried
    memory), not a copy of it: the same weights as the trainer's step on the same batch."""
    from foldformer import FoldedConfig
    from foldformer.train import Trainer

    calls = []
    step_of_trainer = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        lambda self, batch: calls.append(batch) or step_of_trainer(self, batch))  # fmt: skip
    config = FoldedConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=1, segment_len=8,
                          memory_len=8)  # fmt: skip
    bench, reference = (throughput.TrainStep(config, 2, 32, "none", False) for _ in range(2))
    bench()
    bench()
    assert len(calls) == 2 and bench.trainer.step == 2
    assert bench.trainer.scheduler.last_epoch == 2 and bench.trainer.cfg.grad_clip == 1.0
    for _ in range(2):
        step_of_trainer(reference.trainer, bench.batch)
    expected = reference.model.state_dict()
    for name, value in bench.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_quick_run_measures_every_kind_and_profiles(throughput, tmp_path):
    out, profile_dir = tmp_path / "throughput.json", tmp_path / "profile"
    assert throughput.main(["--quick", "--out", str(out), "--profile", str(profile_dir)]) == 0
    results = json.loads(out.read_text())  # strict JSON: no NaN on a CPU
    assert results["bf16_matmul_flops"] > 0 and "6·N·(m+w)/w" in results["mfu_convention"]

    training, streaming = results["training"], results["streaming"]
    for row in training + streaming:
        assert_measured(row)
        assert row["compile_mode"] in ("none", "default", "reduce-overhead")
    # seed is byte-level, base keeps its 8192 tokens; both checkpointing settings are measured
    assert {(r["preset"], r["vocab_size"]) for r in training} == {("seed", 257), ("base", 8192)}
    assert {r["checkpoint"] for r in training if r["preset"] == "base"} == {True, False}
    assert all(r["step_seconds"] > 0 and r["steps"] >= 1 for r in training)
    assert {r["preset"] for r in streaming} == {"seed", "base"}
    for row in streaming:
        assert row["chunks"] * row["chunk"] == row["stream_tokens_per_row"]

    for name in ("seed", "base"):
        summary = results["profile"][name]
        assert "error" not in summary, summary
        assert summary["step_seconds_unprofiled"] > 0 and summary["tokens_per_s_unprofiled"] > 0
        text = (profile_dir / f"profile_{name}.txt").read_text()
        assert "key_averages sorted by" in text and "aten::" in text
    assert not list(profile_dir.glob("trace_*"))  # traces only with --trace


def test_only_runs_the_chosen_parts(throughput, tmp_path):
    out = tmp_path / "stream.json"
    assert throughput.main(["--quick", "--only", "stream", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["training"] == [] and results["profile"] == {}
    assert results["streaming"] and all(r["tokens_per_s"] > 0 for r in results["streaming"])
    with pytest.raises(SystemExit, match="unknown part"):
        throughput.main(["--quick", "--only", "stream,trian", "--out", str(out)])


def test_resume_keeps_measured_rows_and_runs_the_rest(throughput, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    common = ["--quick", "--no-compile", "--only", "stream"]
    assert throughput.main([*common, "--out", str(first), "--budget", "1e-9"]) == 0
    old = json.loads(first.read_text())
    # Pretend the seed stream row was measured (without compile both base rows are one key).
    row = next(r for r in old["streaming"] if r["preset"] == "seed")
    row.update(tokens_per_s=123.0, mfu=0.5, stream_tokens_per_row=row.pop("total_tokens"))
    del row["skipped"]
    first.write_text(json.dumps(old))
    assert throughput.main([*common, "--out", str(second), "--resume", str(first)]) == 0
    new = json.loads(second.read_text())
    kept = [r for r in new["streaming"] if "from_run" in r]
    assert (
        len(kept) == 1 and kept[0]["tokens_per_s"] == 123.0 and kept[0]["from_run"] == old["date"]
    )
    assert new["training"] == []
    for row in [r for r in new["streaming"] if "from_run" not in r]:
        assert_measured(row)


def test_a_spent_budget_skips_rows_and_a_slow_row_is_cut(throughput, tmp_path):
    out = tmp_path / "skipped.json"
    assert throughput.main(["--quick", "--only", "base_train", "--budget", "1e-9",
                            "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["training"]
    assert rows and all("skipped" in r and r["batch"] == 2 for r in rows)

    def slow(batch, rate):
        time.sleep(5)
        return {}

    setting = throughput.Setting("stream", "streaming", "base", slow, {"batch": 3})
    start = time.perf_counter()
    row = throughput.run_setting(setting, rate=1.0, deadline=math.inf, row_timeout=0.2)
    assert time.perf_counter() - start < 3
    assert row["error"].startswith("RowTimeout") and row["batch"] == 3


def test_kernel_summary_splits_kernel_time_and_counts_overlap_once(throughput):
    events = [  # (name, start_us, end_us) over 2 steps
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 40),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_TNT", 100, 140),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 40, 60),
        ("triton_per_fused_add_mul_rsqrt_0", 50, 70),  # overlaps the attention kernel
        ("Memcpy DtoD (Device -> Device)", 200, 210),
    ]
    summary = throughput.kernel_summary(events, wall_seconds=400e-6, steps=2)
    assert summary["kernels_per_step"] == 2.5
    assert summary["kernel_seconds_per_step"] == pytest.approx(130e-6 / 2)
    assert summary["gpu_busy_seconds_per_step"] == pytest.approx(120e-6 / 2)  # 50..60 once
    assert summary["gpu_busy_fraction"] == pytest.approx(120 / 400)
    fractions = summary["kernel_fraction_by_kind"]
    assert fractions == pytest.approx(
        {"matmul": 80 / 130, "attention": 20 / 130, "triton": 20 / 130, "other": 10 / 130}
    )
    assert throughput.kernel_kind("triton_tem_fused_mm_0") == "matmul"
    assert throughput.kernel_kind("triton_poi_fused__scaled_dot_product_attention_3") == "triton"
    assert throughput.kernel_kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"


def test_scaling_throughput_skips_the_compile_interval(tmp_path):
    scaling = load("scaling")
    metrics = tmp_path / "metrics.jsonl"
    records = [  # 100 tokens a step; the first interval (compile) is slow
        {"step": 5, "tokens": 500, "tokens_per_s": 10.0, "loss": 5.0},
        {"step": 10, "tokens": 1000, "tokens_per_s": 100.0, "loss": 4.0},
        {"step": 15, "tokens": 1500, "tokens_per_s": 50.0, "loss": 3.5},
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    measured = scaling.run_throughput(metrics)
    assert measured["tokens_per_s"] == pytest.approx(1000 / (5 + 10))  # tokens over time
    assert measured["intervals_used"] == 2 and measured["steps_measured"] == 10
    rows = [{"gpus": 1, "tokens_per_s": 100.0}, {"gpus": 2, "tokens_per_s": 180.0},
            {"gpus": 2, "fsdp": True, "error": "exit status 1"}]  # fmt: skip
    scaling.efficiencies(rows)
    assert rows[1]["tokens_per_s_per_gpu"] == 90.0 and rows[1]["scaling_efficiency"] == 0.9
    assert "scaling_efficiency" not in rows[2]
    metrics.write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match="1 logged interval"):
        scaling.run_throughput(metrics)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_scaling_script_runs_two_gloo_processes(tmp_path):
    out = tmp_path / "scaling.json"
    env = {**os.environ, "SCALING_FSDP": "0", "PYTHON": sys.executable,
           "SCALING_WORK": str(tmp_path / "work")}  # fmt: skip
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "scaling.sh"), str(out), "--quick"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert [r["gpus"] for r in runs] == [1, 2], runs
    for run in runs:
        assert "error" not in run, (run, done.stdout[-2000:])
        assert run["tokens_per_s"] > 0 and run["intervals_used"] == 2
        assert run["per_gpu_batch"] == 4 and "--nproc_per_node" in run["command"]
    assert runs[0]["scaling_efficiency"] == 1.0
    assert runs[1]["tokens_per_s_per_gpu"] == pytest.approx(runs[1]["tokens_per_s"] / 2)
    assert runs[1]["scaling_efficiency"] > 0  # CPU processes sharing cores: no more to say
    kept = sorted(p.name for p in (tmp_path / "scaling_runs").iterdir())
    assert kept == ["ddp_1.log", "ddp_1.metrics.jsonl", "ddp_2.log", "ddp_2.metrics.jsonl"]


def test_packed_fold_attention_keeps_every_row_to_itself(monkeypatch):
    """benchmarks/seed_step.py packs several 24-position folds into one FlexAttention sequence:
    each row must still see exactly its own causal past (forward only: no CPU backward)."""
    import torch

    from foldformer.model import causal_attention

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # seed_step imports throughput
    seed_step = load("seed_step")
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 24, 16) for _ in range(3))  # packed 4 rows to a sequence
    packed = torch.compile(seed_step.packed_causal_attention)(q, k, v)
    torch.testing.assert_close(packed, causal_attention(q, k, v))
    q, k, v = (t[:7] for t in (q, k, v))  # 7 rows cannot be packed: plain attention
    torch.testing.assert_close(
        seed_step.packed_causal_attention(q, k, v), causal_attention(q, k, v)
    )


def test_seed_step_picks_rows_and_names_a_wrong_pick(monkeypatch, tmp_path, capsys):
    """`seed_step.py --rows modes --pick 2` reruns one row of a group (as its results record)."""
    import json

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    seed_step = load("seed_step")
    ran = []
    monkeypatch.setattr(seed_step, "matmul_rate", lambda: 1.0)
    monkeypatch.setattr(seed_step, "row", lambda *args: ran.append(args[:5]) or {"mfu": 0.5})
    out = tmp_path / "modes.json"
    assert seed_step.main(["--rows", "modes", "--pick", "2", "0", "--out", str(out)]) == 0
    modes = seed_step.ROWS["modes"]
    assert ran == [modes[2], modes[0]]
    assert [r["mfu"] for r in json.loads(out.read_text())["rows"]] == [0.5, 0.5]
    with pytest.raises(SystemExit):
        seed_step.main(["--rows", "modes", "--pick", "3", "--out", str(out)])
    assert "--pick [3]: --rows modes has rows 0 to 2" in capsys.readouterr().err


def test_explain_seed_bins_amplitude_on_the_ecl_grid(capsys):
    """benchmarks/explain_seed.py: a position's amplitude split into its window's tokens and
    the bins (low, high] of tokens back from the window start, a short context filling fewer;
    a bad --gate or offset is one line naming it."""
    from foldformer.explain import Amplitude

    explain_seed = load("explain_seed")
    record = Amplitude(position=10, amplitude=torch.full((11,), 1 / 11, dtype=torch.float64),
                       initial_memory=0.0)  # fmt: skip
    edges = explain_seed.bin_edges([0, 2, 4, 8, 16], context=8)
    assert edges == [2, 4, 8] and explain_seed.bin_names(edges)[1:] == [
        "(0, 2]",
        "(2, 4]",
        "(4, 8]",
    ]
    # window start 7: tokens 7..10 in the window, 6 and 5 within 2 back, 4 and 3, then 2..0
    bins = explain_seed.amplitude_bins(record, 7, edges)
    assert bins == pytest.approx([4 / 11, 2 / 11, 2 / 11, 3 / 11])
    assert explain_seed.share_beyond(bins) == pytest.approx([7 / 11, 5 / 11, 3 / 11])
    measure = ["measure", "CKPT", "--name", "m", "--data", "D", "--ecl", "E", "--out", "O"]
    for bad, message in ((["--gate", "max"], "--gate 'max' is not one of"),
                         (["--offsets", "64"], "--offsets in 0..63")):  # fmt: skip
        with pytest.raises(SystemExit):
            explain_seed.main(measure + bad)
        assert message in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_explain_seed_measures_and_reports_a_gated_model(tmp_path, capsys):
    """`explain_seed.py measure` on a tiny gated model beside its real ECL records, per gate,
    then `report`: every position's bins hold all its amplitude, the summary's shares beyond d
    follow from them, the budget cuts after one target, and the JSON and plot are written."""
    import json

    import numpy as np

    from foldformer.cli import main as cli
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.models import build_model

    explain_seed = load("explain_seed")
    torch.manual_seed(0)
    model = tmp_path / "model"
    shape = dict(vocab_size=257, d_model=16, n_layers=2, n_heads=2, segment_len=4, memory_len=4,
                 memory_gate=True)  # fmt: skip
    build_model("folded", shape).save_pretrained(model)
    ByteTokenizer().save(model)
    rng = np.random.default_rng(0)
    (tmp_path / "docs").mkdir()
    for i in range(3):
        words = rng.choice(["the ", "sea ", "ship ", "night, ", "and\n"], size=120)
        (tmp_path / "docs" / f"book{i}.txt").write_text("".join(words))
    data, cache = str(tmp_path / "docs"), str(tmp_path / "cache")
    cli(["eval", "ecl", str(model), "--data", data, "--cache-dir", cache, "--targets", "6",
         "--max-distance", "32", "--control", "--bootstrap", "50", "--out", str(tmp_path)])  # fmt: skip
    parts = []
    for gate, budget in (("channels", "0"), ("mean", "1e-9")):
        parts.append(tmp_path / f"{gate}.json")
        explain_seed.main(["measure", str(model), "--name", "gated", "--gate", gate,
                           "--data", data, "--cache-dir", cache, "--ecl", str(tmp_path / "ecl.json"),
                           "--context", "48", "--targets", "3", "--offsets", "0", "5",
                           "--budget-s", budget, "--out", str(parts[-1])])  # fmt: skip
    channels, mean = (json.loads(p.read_text())["explain"] for p in parts)
    assert channels["targets"] == 3 and mean["targets"] == 1  # the budget ran out after one
    assert channels["bin_edges"] == [4, 8, 16, 32, 48]
    assert len(channels["records"]) == 6 and {r["offset"] for r in channels["records"]} == {0, 5}
    for record in channels["records"] + mean["records"]:
        assert sum(record["bins"]) == pytest.approx(1, abs=1e-9)
        assert len(record["bins"]) == 6 and min(record["bins"]) >= 0
        assert record["horizon"] == sorted(record["horizon"])  # 50% <= 90% <= 99%
    summary = channels["summary"]
    assert summary["positions"] == 6
    beyond = list(summary["share_beyond"].values())
    assert list(summary["share_beyond"]) == ["0", "4", "8", "16", "32"]
    assert beyond[0] == pytest.approx(1 - summary["bin_share"][0])
    assert beyond == sorted(beyond, reverse=True) and beyond[-1] == pytest.approx(
        summary["bin_share"][-1]
    )
    explain_seed.main(["report", str(tmp_path / "out"), *map(str, parts), "--command", "run it"])
    result = json.loads((tmp_path / "out" / "explain_seed.json").read_text())
    assert result["commands"] == ["run it"] and result["seed"] == 0
    gated = result["models"]["gated"]
    assert set(gated["explain"]) == {"channels", "mean"}
    assert gated["ecl"]["distances"] == [0, 4, 8, 16, 32]
    share = gated["ecl"]["loss_share_beyond"]
    assert share[0] == pytest.approx(1) and share[-1] == 0
    assert gated["model_config"]["memory_gate"] is True
    assert (tmp_path / "out" / "explain_seed.png").stat().st_size > 0
    assert "== gated: ECL" in capsys.readouterr().out


def tiny_pg_archive(tmp_path: Path) -> Path:
    """A pg.tar.xz of one training author and every validation author, a short book each."""
    import io
    import tarfile

    from foldformer.data.text import PG_VALIDATION_AUTHORS

    archive = tmp_path / "pg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for author in ("austen-jane", *PG_VALIDATION_AUTHORS):
            text = " ".join(f"A {author} book, sentence {j}, is long enough." for j in range(60))
            info = tarfile.TarInfo(f"pg/{author}/book.txt")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return archive


def test_make_pg_small_keeps_the_validation_split_and_one_book_per_training_author(tmp_path):
    """benchmarks/make_pg_small.py (the GPU carry's pg subset): the validation background is
    the full archive's, sentence for sentence; each training author keeps its first book."""
    import io
    import tarfile

    from foldformer.data.babilong import load_background

    archive = tiny_pg_archive(tmp_path)
    with tarfile.open(tmp_path / "two.tar", "w") as tar:
        with tarfile.open(archive) as old:
            for member in old.getmembers():
                tar.addfile(member, old.extractfile(member))
        rows = ["path\tauthor\n"]
        for title in ("a-first.txt", "b-second.txt", "c-third.txt"):
            text = f"The {title} of Austen, sentence one. And sentence two is here."
            info = tarfile.TarInfo(f"pg/austen-jane/{title}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
            rows.append(f"austen-jane/{title}\tAusten, Jane\n")
        manifest = "".join(rows).encode()
        info = tarfile.TarInfo("pg/manifest.tsv")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    small = tmp_path / "small.tar.xz"
    load("make_pg_small").main(str(tmp_path / "two.tar"), str(small))
    with tarfile.open(small) as tar:
        austen = sorted(n for n in tar.getnames() if n.startswith("pg/austen-jane/"))
        manifest = tar.extractfile("pg/manifest.tsv").read().decode()
    assert austen == ["pg/austen-jane/a-first.txt"]
    assert manifest == "path\tauthor\nausten-jane/a-first.txt\tAusten, Jane\n"
    full = load_background(f"{tmp_path / 'two.tar'}?split=validation")
    assert load_background(f"{small}?split=validation") == full and len(full) > 100


def test_babilong_gpu_smoke_trains_evaluates_and_packs(tmp_path, capsys):
    """benchmarks/babilong_gpu.py --smoke end to end on a CPU (one model; the matched plan for
    all three): every length evaluated on the validation authors' books, and the JSON, the plot
    and a logs tarball without checkpoints are all that OUT holds."""
    import tarfile

    from foldformer.data.babilong import TokenizedBackground, load_background
    from foldformer.data.sources import build_batch_source
    from foldformer.data.tokenizers import ByteTokenizer

    babilong = load("babilong_gpu")
    archive = tiny_pg_archive(tmp_path)
    babi = str(Path(__file__).resolve().parent / "fixtures" / "babi")
    out = tmp_path / "out"
    argv = ["--smoke", "--pg", str(archive), "--babi", babi, "--out", str(out), "--minutes",
            "0.05", "--lengths", "0,300,1K", "--samples", "4", "--work", str(tmp_path / "w")]  # fmt: skip
    # The plan: RMT and no-memory matched to the folded model within 10%.
    target, runs = babilong.plan(babilong.parse_args(argv))
    assert runs["no_memory"]["run"]["model"]["memory_len"] == 0
    assert runs["rmt"]["run"]["model"]["model_type"] == "rmt"
    assert all(abs(r["planned_parameters"] / target - 1) <= 0.10 for r in runs.values())
    # --data-options reach the training task (round 7's levers on BABILong)
    options = babilong.parse_args([*argv, "--data-options", "uniform=true&straddle=0.5"])
    spec = babilong.data_spec(options, "qa1")
    assert spec.endswith("&mix=0.5&uniform=true&straddle=0.5")
    task = build_batch_source(spec, ByteTokenizer(), batch_size=2, seq_len=128, segment_len=16)
    assert task.uniform and task.straddle == 0.5
    assert babilong.main([*argv, "--models", "folded"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "babilong.json",
        "babilong.png",
        "babilong_logs.tar.gz",
    ]
    summary = json.loads((out / "babilong.json").read_text())
    (result,) = summary["results"]
    assert result["model"] == "folded" and result["matched"] and result["train"]["steps"] >= 1
    assert [c["length"] for c in result["cells"]] == [0, 300, 1024]
    for cell in result["cells"]:
        assert cell["n"] == 4 and 0 <= cell["accuracy"] <= 1 and cell["seconds"] > 0
    assert result["cells"][2]["mean_prompt_tokens"] == 1024  # exact lengths: one batch
    # the background is the validation authors' books, not the training author's
    validation = TokenizedBackground(
        load_background(f"{archive}?split=validation"), ByteTokenizer()
    )
    assert result["background_tokens"] == int(validation.starts[-1])
    with tarfile.open(out / "babilong_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "babilong_logs/folded_qa1/metrics.jsonl" in names
    assert not any(n.endswith(".safetensors") for n in names)
    assert "folded" in capsys.readouterr().out


def test_babilong_gpu_keeps_models_and_evaluates_them_again_without_training(tmp_path):
    """--keep-models packs each trained model's weights (not its optimizer state) in the logs;
    --trained on the unpacked logs evaluates the same model again, training nothing, with the
    same answers (so a later call can run the long lengths of an earlier call's models)."""
    import tarfile

    babilong = load("babilong_gpu")
    archive = tiny_pg_archive(tmp_path)
    babi = str(Path(__file__).resolve().parent / "fixtures" / "babi")
    common = ["--smoke", "--pg", str(archive), "--babi", babi, "--minutes", "0.05",
              "--lengths", "0,300", "--samples", "4", "--work", str(tmp_path / "w"),
              "--models", "folded"]  # fmt: skip
    first = tmp_path / "first"
    assert babilong.main([*common, "--out", str(first), "--keep-models"]) == 0
    with tarfile.open(first / "babilong_logs.tar.gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert "babilong_logs/folded_qa1/model/model.safetensors" in names
    assert not any("optim" in n for n in names)
    again = tmp_path / "again"
    trained = str(tmp_path / "unpacked" / "babilong_logs")
    assert babilong.main([*common, "--out", str(again), "--trained", trained]) == 0
    (before,) = json.loads((first / "babilong.json").read_text())["results"]
    (after,) = json.loads((again / "babilong.json").read_text())["results"]
    assert after["train"] == {**before["train"], "trained": f"{trained}/folded_qa1/model"}
    assert [c["examples"] for c in after["cells"]] == [c["examples"] for c in before["cells"]]
    assert [c["correct"] for c in after["cells"]] == [c["correct"] for c in before["cells"]]
    with pytest.raises(SystemExit, match="no folded_qa1/model/config.json"):
        babilong.main([*common, "--out", str(tmp_path / "bad"), "--trained", str(tmp_path)])
    # folded_init: the folded model started from a trained model's weights, beside the others
    model_dir = f"{trained}/folded_qa1/model"
    init = [a for a in common if a != "folded"] + ["folded_init,rmt", "--init", model_dir]
    target, runs = babilong.plan(babilong.parse_args([*init, "--out", str(tmp_path / "i")]))
    assert runs["folded_init"]["run"]["train"]["init_from"] == model_dir
    folded = json.loads((first / "babilong.json").read_text())["runs"]["folded"]
    assert runs["folded_init"]["run"]["model"] == folded["model"]
    assert runs["folded_init"]["planned_parameters"] == target
    assert not runs["rmt"]["run"]["train"].get("init_from")
    for bad in (["--models", "folded_init"], ["--models", "folded", "--init", model_dir]):
        argv = [a for a in common if a not in ("--models", "folded")] + bad
        with pytest.raises(SystemExit):
            babilong.parse_args([*argv, "--out", str(tmp_path / "bad")])


def test_passkey_trace_and_folds_ask_where_eval_passkey_asks(tmp_path):
    """passkey_trace.py reads K prompts that differ only in their key and asks the question at
    2^k and 1.5 * 2^k folds, exactly where the §6 prompt of that many folds asks it (its
    accuracy there is evaluate_passkey's on those keys); the memory of a model with memory
    depends on the key (spread > 0), a gate holding nothing changes every entry (held 0).
    passkey_folds.py gives evaluate_passkey's accuracy by fold count."""
    from foldformer.data.passkey import build_passkey_prompt
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.evaluate.common import load_checkpoint
    from foldformer.evaluate.passkey import is_correct
    from foldformer.generate import greedy_generate
    from foldformer.models import build_model

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    shape = dict(vocab_size=257, d_model=16, n_layers=1, n_heads=2, segment_len=64,
                 memory_len=8)  # fmt: skip
    build_model("folded", shape).save_pretrained(model_dir)
    ByteTokenizer().save(model_dir)
    trace = load("passkey_trace")
    trace.main([str(model_dir), "--out", str(tmp_path / "trace.json"), "--keys", "3",
                "--max-tokens", "800", "--trained", "256"])  # fmt: skip
    record = json.loads((tmp_path / "trace.json").read_text())
    rows = record["checkpoints"]
    assert [r["folds"] for r in rows] == [2, 3, 4, 6, 8, 12]
    assert [r["level"] for r in rows] == [True, False, True, False, True, False]
    assert all(r["key_spread"] > 0 for r in rows)  # the keys differ, so do the memories
    assert all(r["held"] == 0.0 for r in rows[1:])  # no gate: the whole memory moves
    model, tok = load_checkpoint(model_dir, "cpu")
    for row in rows[:3]:  # the same prompts, answered in one piece, give the same answers
        prompt = build_passkey_prompt(tok, row["folds"] * 64, 0.0, key=record["keys"][0])
        assert prompt.context_len == row["tokens"]
        text = tok.decode(greedy_generate(model, torch.tensor([prompt.ids]), 8)[0].tolist())
        assert text == row["answers"][0]
        assert row["accuracy"] == sum(
            is_correct(t, k) for t, k in zip(row["answers"], record["keys"], strict=True)
        ) / 3  # fmt: skip
    folds = load("passkey_folds")
    folds.main([str(model_dir), "--out", str(tmp_path / "folds.json"), "--folds", "2,3",
                "--depths", "0,1", "--samples", "2"])  # fmt: skip
    by = json.loads((tmp_path / "folds.json").read_text())["rows"]
    assert [(r["folds"], r["level"], sorted(k for k in r if k.startswith("depth"))) for r in by] \
        == [(2, True, ["depth_0", "depth_1"]), (3, False, ["depth_0", "depth_1"])]  # fmt: skip


def test_babilong_phase_puts_every_answer_across_a_fold_at_whole_folds_only(tmp_path):
    """benchmarks/babilong_phase.py: exact prompts of a multiple of w tokens end on a fold's
    last token, so every answer straddles a fold boundary; w / 2 tokens shorter, none does.
    Two models read the same prompts (the same answers from the same weights)."""
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.models import build_model

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    build_model("folded", dict(vocab_size=257, d_model=16, n_layers=1, n_heads=2, segment_len=64,
                               memory_len=8)).save_pretrained(model_dir)  # fmt: skip
    ByteTokenizer().save(model_dir)
    babi = str(Path(__file__).resolve().parent / "fixtures" / "babi")
    out = tmp_path / "phase.json"
    load("babilong_phase").main([str(model_dir), str(model_dir), "--pg",
                                 str(tiny_pg_archive(tmp_path)), "--babi", babi, "--out", str(out),
                                 "--lengths", "512", "--shifts", "0,32", "--samples", "3"])  # fmt: skip
    cells = json.loads(out.read_text())["cells"]
    assert [(c["tokens"], c["straddling"]) for c in cells] == [(512, 1.0), (480, 0.0)] * 2
    assert [c["examples"] for c in cells[:2]] == [c["examples"] for c in cells[2:]]


def test_passkey_preset_is_the_round7_recipe():
    """`--preset passkey` is the configuration round 7's seed-0 model was trained with (its
    recorded run_config.json, docs/retrieval.md), bar the run-length, logging and device
    settings."""
    from foldformer.train import load_run_config

    recorded = BENCHMARKS / "results/h200/retrieval/round7/scratch/run/run_config.json"
    round7 = load_run_config(recorded).to_dict()
    preset = load_run_config(None, "passkey").to_dict()
    assert preset["model"] == round7["model"]
    assert preset["data"] == round7["data"]
    assert preset["train"]["eval_every"] == round7["train"]["eval_every"] == 0  # no validation
    settings = {"max_minutes", "save_every", "progress", "compile", "device", "eval_batches"}
    differ = {k for k in preset["train"] if preset["train"][k] != round7["train"][k]}
    assert differ <= settings, differ


def test_babilong_memorised_compares_training_and_held_out_questions(tmp_path, monkeypatch):
    """benchmarks/babilong_memorised.py: the same number of questions from the training
    stories and from the held-out ones (split_babi), on the story alone, with counts,
    intervals and the command in the record."""
    from foldformer.data.babilong import babi_file, load_babi, split_babi
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.models import build_model

    memorised = load("babilong_memorised")
    asked = []  # (pool, lengths) of every call

    def recording(pool, background, lengths, n, tokenizer, seed=0):
        asked.append((list(pool), list(lengths), background))
        return build_eval_samples(pool, background, lengths, n, tokenizer, seed=seed)

    build_eval_samples = memorised.build_eval_samples
    monkeypatch.setattr(memorised, "build_eval_samples", recording)

    torch.manual_seed(0)
    model = tmp_path / "model"
    shape = dict(vocab_size=257, d_model=16, n_layers=1, n_heads=2, segment_len=16, memory_len=16)
    build_model("folded", shape).save_pretrained(model)
    ByteTokenizer().save(model)
    babi = str(Path(__file__).resolve().parent / "fixtures" / "babi")
    out = tmp_path / "memorised.json"
    record = memorised.main([str(model), "--babi", babi, "--samples", "6", "--out", str(out)])
    train, held_out = split_babi(load_babi(babi_file("qa1", babi)))
    assert asked == [(train, [0], []), (held_out, [0], [])]
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    cells = record["models"][str(model)]
    for split in ("train", "held_out"):
        cell = cells[split]
        assert cell["n"] == 6 and cell["accuracy"] == cell["correct"] / 6
        assert cell["interval"][0] <= cell["accuracy"] <= cell["interval"][1]
    assert record["command"].endswith(f"--out {out}")
