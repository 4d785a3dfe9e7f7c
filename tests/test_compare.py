"""`foldformer compare`: a micro comparison runs end to end, sizes are matched and enforced,
a missing peer is skipped with its reason, and a re-run reuses finished models."""

from __future__ import annotations

import json
import re

import pytest
import torch

import foldformer.compare
import foldformer.train
from foldformer.cli import main
from foldformer.compare import (
    CompareError,
    ParameterMismatchError,
    check_parameter_band,
    load_compare_config,
    plan_models,
)
from foldformer.config import ConfigError
from foldformer.evaluate.records import load_records, validate_record
from foldformer.variants import peers

BOOK = " ".join(
    f"Chapter {i}. The traveller walked along the river for {i} days. "
    f"He saw a heron, a mill and a bridge. Nobody knew where the road would end."
    for i in range(40)
)

MICRO = """
[model]
d_model = 32
n_layers = 1
n_heads = 2
segment_len = 8
memory_len = 8

[compare]
models = ["folded", "no_memory", "peer_xl"]

[train]
batch_size = 2
seq_len = 32
max_steps = 3
warmup_steps = 1
eval_every = 3
eval_batches = 1
save_every = 0
log_every = 1
progress = false

[data]
train = ["{root}/train.txt"]
val = ["{root}/val_a.txt", "{root}/val_b.txt"]
cache_dir = "{root}/cache"

[eval]
ecl_targets = 4
ecl_max_distance = 16
ecl_bootstrap = 50
passkey_lengths = [128]
passkey_depths = [0.5]
passkey_samples = 1
lm_max_tokens = 200
memory_lengths = [32, 64]
"""


@pytest.fixture(autouse=True)
def restore_threads():
    """compare sets torch to one CPU thread (its default); later tests get their setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "train.txt").write_text(BOOK)
    (tmp_path / "val_a.txt").write_text(BOOK.replace("heron", "swan"))
    (tmp_path / "val_b.txt").write_text(BOOK.replace("mill", "tower"))
    config = tmp_path / "micro.toml"
    config.write_text(MICRO.replace("{root}", str(tmp_path)))
    return tmp_path


def peer_missing(monkeypatch):
    """Simulate a machine without the peers' PyPI packages."""

    def require_peer(module, package, model_type):
        raise peers.PeerUnavailableError(
            f"model_type {model_type!r} wraps the PyPI package {package!r}, which is not "
            f"installed. Install the peers with: pip install 'foldformer[peers]'"
        )

    monkeypatch.setattr(peers, "require_peer", require_peer)


def test_micro_comparison_writes_one_row_per_model_and_reuses_finished_models(
    workspace, monkeypatch, capsys
):
    peer_missing(monkeypatch)
    out = workspace / "out"
    assert (
        main(["compare", str(workspace / "micro.toml"), "--out", str(out), "--threads", "1"]) == 0
    )
    printed = capsys.readouterr().out

    # sizes printed per model with the ratio to the folded model
    assert "matched to the folded model's" in printed
    assert "no_memory" in printed and "ratio 0.9" in printed
    assert "peer_xl" in printed and "skipped" in printed and "foldformer[peers]" in printed

    records = json.loads((out / "results.json").read_text())
    for record in records:
        validate_record(record)
    assert records[0]["metric"] == "comparison"
    assert records[0]["extra"]["models"] == ["folded", "no_memory"]
    assert records[0]["hardware"]["cpu_count"] >= 1 and records[0]["code_version"]["package"]
    by_model = {}
    for r in records[1:]:
        by_model.setdefault(r["config"]["name"], set()).add(r["metric"])
    assert set(by_model) == {"folded", "no_memory", "peer_xl"}
    for name in ("folded", "no_memory"):
        assert {"non_embedding_parameters", "tokens_seen", "train_seconds", "final_val_loss",
                "ecl", "passkey_accuracy", "bits_per_byte", "peak_memory_mib",
                "tokens_per_second"} <= by_model[name]  # fmt: skip
    assert by_model["peer_xl"] == {"model_skipped"}
    tokens = {r["config"]["name"]: r["value"] for r in records if r["metric"] == "tokens_seen"}
    assert tokens == {"folded": 3 * 2 * 32, "no_memory": 3 * 2 * 32}  # one token budget
    ratios = [r["extra"]["ratio"] for r in records if r["metric"] == "non_embedding_parameters"]
    assert all(0.9 <= x <= 1.1 for x in ratios)
    # m = 0 cannot see before the window: ECL is 0 by construction
    ecl = {r["config"]["name"]: r["value"] for r in records if r["metric"] == "ecl"}
    assert ecl["no_memory"] == 0

    text = (out / "results.md").read_text()
    table = text[text.index("| model | non-emb.") :].split("\n\n")[0]  # the results table
    rows = [line for line in table.splitlines() if "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["folded", "no_memory", "peer_xl"]
    assert "skipped" in rows[-1]
    assert "passkey 128" in rows[0] and "ECL" in rows[0]
    assert "| no_memory | folded | 32 |" in text  # the shapes table
    for png in ("ecl.png", "memory.png", "training.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "models" / "folded" / "final" / "config.json").is_file()

    # A re-run trains and evaluates nothing again: both models finished.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    evaluate_model = foldformer.compare.evaluate_model
    monkeypatch.setattr(foldformer.train, "train", no_training)
    monkeypatch.setattr("foldformer.compare.evaluate_model", no_training)
    (out / "results.json").unlink()
    assert main(["compare", str(workspace / "micro.toml"), "--out", str(out)]) == 0
    assert "already trained" in capsys.readouterr().out
    assert len(load_records([out / "results.json"])) == len(records)

    # Changed evaluation settings evaluate the finished models again without training them:
    # with the unrelated-context control, each model gets content-gain records and a column.
    monkeypatch.setattr("foldformer.compare.evaluate_model", evaluate_model)
    assert main(["compare", str(workspace / "micro.toml"), "--out", str(out),
                 "--set", "eval.ecl_control=true"]) == 0  # fmt: skip
    controlled = load_records([out / "results.json"])
    gains = {r["config"]["name"] for r in controlled if r["metric"] == "context_content_gain"}
    assert gains == {"folded", "no_memory"}
    assert "content gain at 16 [95%]" in (out / "results.md").read_text()

    # ... but a changed configuration is refused rather than silently mixed with old models.
    with pytest.raises(CompareError, match="lr"):
        main(["compare", str(workspace / "micro.toml"), "--out", str(out),
              "--set", "train.lr=0.01"])  # fmt: skip


def test_an_interrupted_comparison_keeps_the_models_it_finished(workspace, monkeypatch):
    peer_missing(monkeypatch)
    out = workspace / "out"
    real_evaluate = foldformer.compare.evaluate_model

    def evaluate_then_fail(name, *args, **kwargs):
        if name == "no_memory":
            raise KeyboardInterrupt  # e.g. a time limit on the second model
        return real_evaluate(name, *args, **kwargs)

    monkeypatch.setattr("foldformer.compare.evaluate_model", evaluate_then_fail)
    with pytest.raises(KeyboardInterrupt):
        main(["compare", str(workspace / "micro.toml"), "--out", str(out), "--threads", "1"])
    records = load_records([out / "results.json"])
    models = {r["config"]["name"] for r in records if r["metric"] == "ecl"}
    assert models == {"folded"}  # the first model's results were written before the second
    assert "| folded |" in (out / "results.md").read_text()


def test_parameter_band_is_enforced(workspace):
    assert check_parameter_band("rmt", 105, 100, 0.10) == pytest.approx(1.05)
    with pytest.raises(ParameterMismatchError, match=r"'rmt' has 120 .*±10%"):
        check_parameter_band("rmt", 120, 100, 0.10)

    # Matching moves d_ff back into the band ...
    config = load_compare_config(
        workspace / "micro.toml",
        {"compare.models": "folded,transformer_xl", "overrides.transformer_xl.d_ff": "1024"},
    )
    target, plans = plan_models(config, vocab_size=257)
    xl = plans[1]
    assert xl.values["d_ff"] != 1024 and 0.9 <= xl.ratio <= 1.1
    assert abs(xl.parameters - target) <= 0.1 * target
    # ... and without matching, the same model is refused before anything trains.
    config = load_compare_config(
        workspace / "micro.toml",
        {"compare.models": "folded,transformer_xl", "compare.match_parameters": "false",
         "overrides.transformer_xl.d_ff": "1024"},
    )  # fmt: skip
    with pytest.raises(ParameterMismatchError, match="transformer_xl"):
        plan_models(config, vocab_size=257)


def test_config_is_checked_and_overridable(workspace):
    path = workspace / "micro.toml"
    config = load_compare_config(
        path, {"data.train": ".carry/pg.tar.xz?split=train", "eval.passkey_lengths": "1K,4K"}
    )
    assert config.data.train == [".carry/pg.tar.xz?split=train"]
    assert config.eval.passkey_lengths == [1024, 4096]
    assert load_compare_config(path, {"eval.memory_lengths": "256"}).eval.memory_lengths == [256]
    with pytest.raises(ConfigError, match="unknown model"):
        load_compare_config(path, {"compare.models": "folded,gpt5"})
    with pytest.raises(ConfigError, match="same token budget"):
        load_compare_config(path, {"train.max_minutes": "5"})
    with pytest.raises(ConfigError, match="section.key"):
        load_compare_config(path, {"lr": "0.1"})
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        load_compare_config(path, {"train.learning_rate": "0.1"})


BAD_SETTINGS = {
    "eval.ecl_targets=abc": "[eval] ecl_targets='abc': expected int",
    "eval.ecl_targets=1": "ecl_targets=1: must be >= 2",
    "eval.seed=abc": "seed='abc': expected int",
    "eval.ecl_control=maybe": "ecl_control='maybe': expected bool",
    "eval.ecl_bootstrap=0": "ecl_bootstrap=0: must be >= 1",
    "eval.ecl_unit=-3": "ecl_unit=-3",
    "eval.ecl_max_distance=1Q": "ecl_max_distance='1Q'",
    "eval.passkey_lengths=0": "passkey_lengths=[0]",
    "eval.passkey_depths=abc": "passkey_depths='abc'",
    "eval.passkey_batch_size=0": "passkey_batch_size=0",
    "eval.lm_max_tokens=-1": "lm_max_tokens=-1",
    "eval.memory_lengths=0": "memory_lengths=[0]",
    "compare.tolerance=abc": "[compare] tolerance='abc': expected float",
    "compare.match_parameters=maybe": "match_parameters='maybe': expected bool",
    "model.d_modell=32": "unknown FoldedConfig field(s) ['d_modell']",
}


@pytest.mark.parametrize("setting", sorted(BAD_SETTINGS))
def test_a_bad_setting_is_refused_by_name(workspace, setting):
    key, _, value = setting.partition("=")
    with pytest.raises(ConfigError) as error:
        load_compare_config(workspace / "micro.toml", {key: value})
    assert BAD_SETTINGS[setting] in str(error.value)


def test_bad_config_files_and_runs_fail_in_one_line_before_training(workspace, capsys):
    from foldformer.cli import console

    (workspace / "broken.toml").write_text("[model\nd_model = 32\n")
    (workspace / "broken.json").write_text('{"model": {"d_model": 32,}}')
    (workspace / "no_val.toml").write_text(
        (workspace / "micro.toml").read_text().replace("\nval = [", "\n# val = [")
    )
    micro, out = workspace / "micro.toml", workspace / "out"
    cases = {
        (str(workspace / "broken.toml"),): "broken.toml is not valid TOML",
        (str(workspace / "broken.json"),): "broken.json is not valid JSON",
        (str(workspace / "no_val.toml"),): "reads held-out text: give [data] val",
        (str(micro), "--device", "gpu"): "train.device 'gpu' is not a device",
        (str(micro), "--set", "eval.ecl_max_distance=1M"): "maximum distance 1M plus the 64",
    }
    for argv, message in cases.items():
        capsys.readouterr()
        assert console(["compare", *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.strip().splitlines()[-1], err
        assert not (out / "models").exists()  # refused before any model trained


def test_overrides_are_typed_like_train_options(workspace):
    """compare reads `--set` and `--section.key` through foldformer.overrides: values by the
    field's type (a string "no" is False, not a truthy string), per model by its own config."""
    path = workspace / "micro.toml"
    config = load_compare_config(
        path,
        {"model.memory_gate": "no", "train.lr": "3e-4", "train.progress": "yes",
         "overrides.rmt.memory_len": "4", "overrides.folded_gate.memory_gate": "false",
         "data.val": "books.tar.xz?authors=Austen,Dickens"},
    )  # fmt: skip
    assert config.model["memory_gate"] is False and config.train.lr == 3e-4
    assert config.train.progress is True
    assert config.overrides == {"rmt": {"memory_len": 4}, "folded_gate": {"memory_gate": False}}
    assert config.data.val == ["books.tar.xz?authors=Austen,Dickens"]  # one spec, commas kept
    bad = {
        "train.lr": ("abc", "train.lr='abc' is not a finite float"),
        "model.memory_gate": ("2", "model.memory_gate='2' is not a bool"),
        "model.d_model": ("abc", "model.d_model='abc' is not an int"),
        "overrides.rmt.memory_len": ("abc", "overrides.rmt.memory_len='abc' is not an int"),
        "overrides.rmt.memory_lenn": ("8", "unknown RMTConfig field(s) ['memory_lenn']"),
        "overrides.gpt5.d_ff": ("8", "unknown option --overrides.gpt5.d_ff"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_compare_config(path, {key: value})


def test_a_misspelt_per_model_field_in_the_file_is_refused(workspace):
    path = workspace / "micro.toml"
    path.write_text(path.read_text() + "\n[overrides.rmt]\nmemory_lenn = 8\n")
    with pytest.raises(ConfigError, match=r"\[overrides.rmt\] sets \['memory_lenn'\]"):
        load_compare_config(path)  # was dropped silently when rmt's config was built
    path.write_text("[overrides]\nrmt = 3\n")
    with pytest.raises(ConfigError, match=r"\[overrides.rmt\] must be a table of fields, got 3"):
        load_compare_config(path)  # was a TypeError traceback


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads 0: give a positive number of CPU threads"),
        (["--threads", "-2"], "--threads -2: give a positive number of CPU threads"),
        (["--set", "train.lr=abc"], "train.lr='abc' is not a finite float"),
        (["--train.lr", "abc"], "train.lr='abc' is not a finite float"),
        (["--model.memory_gate", "2"], "model.memory_gate='2' is not a bool"),
        (["--lr", "0.1"], "override 'lr' is not section.key"),
        (["--set", "=3"], "override '' is not section.key"),
        (["--models", ","], "[compare] models is empty"),
        (["--out", "{root}/micro.toml/out"], "micro.toml/out is not a writable folder"),
    ],
)
def test_a_bad_compare_flag_is_one_line_naming_it(workspace, capsys, argv, message):
    from foldformer.cli import console

    out = workspace / "out"
    argv = [a.replace("{root}", str(workspace)) for a in argv]  # a later --out wins
    assert console(["compare", str(workspace / "micro.toml"), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("foldformer: error: ") and err.count("\n") == 1, err
    assert message in err and not (out / "models").exists()


# -- Hugging Face decoders (foldformer.fold / wrap_rmt) in a comparison -------------------------


def save_llama(folder, vocab_size=257, intermediate_size=64, max_positions=64):
    """A tiny pretrained-to-be Llama checkpoint of the micro shape (d 32, 1 layer, 2 heads)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate_size,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_hugging_face_decoders_compare_alongside_the_folded_model(workspace, monkeypatch, capsys):
    """hf_folded fine-tunes a pretrained folder (init_from), hf_rmt is a fresh GPT-2 of the
    folded model's shape: both train on the same tokens at matched size, are evaluated, and a
    re-run reuses them."""
    from safetensors.torch import load_file

    from foldformer.models import load_model

    pretrained = save_llama(workspace / "llama")
    path = workspace / "micro.toml"
    path.write_text(
        path.read_text().replace('"no_memory", "peer_xl"', '"hf_folded", "hf_rmt"')
        + f'\n[overrides.hf_folded]\ninit_from = "{pretrained}"\n'
        + '\n[overrides.hf_rmt]\nfamily = "gpt2"\nmemory_len = 4\n'
    )
    out = workspace / "out"
    assert main(["compare", str(path), "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.strip().startswith("hf_folded"))
    assert "d_ff=64 w=8 m=8" in line  # the checkpoint's shape, as it is

    records = load_records([out / "results.json"])
    assert records[0]["extra"]["models"] == ["folded", "hf_folded", "hf_rmt"]
    tokens = {r["config"]["name"]: r["value"] for r in records if r["metric"] == "tokens_seen"}
    assert tokens == {"folded": 3 * 2 * 32, "hf_folded": 3 * 2 * 32, "hf_rmt": 3 * 2 * 32}
    sizes = {r["config"]["name"]: r for r in records if r["metric"] == "non_embedding_parameters"}
    for name in ("hf_folded", "hf_rmt"):
        assert 0.9 <= sizes[name]["extra"]["ratio"] <= 1.1
        metrics = {r["metric"] for r in records if r["config"].get("name") == name}
        assert {"ecl", "passkey_accuracy", "bits_per_byte", "final_val_loss"} <= metrics
        model = load_model(out / "models" / name / "final")
        assert model.num_parameters() == sizes[name]["value"]  # the count is the trained model's
    assert sizes["hf_folded"]["config"]["model"]["hf_model"] == str(pretrained)
    assert sizes["hf_rmt"]["config"]["model"]["hf_config"]["model_type"] == "gpt2"
    assert sizes["hf_rmt"]["config"]["model"]["memory_len"] == 4

    # hf_folded started from the checkpoint: 3 steps of lr 1e-3 move a weight by ~3e-3 at
    # most, while another random start (std 0.02) differs from it by ~0.1 somewhere
    start = load_file(pretrained / "model.safetensors")
    tuned = load_model(out / "models" / "hf_folded" / "final").decoder.state_dict()
    key = "model.layers.0.mlp.down_proj.weight"
    assert (tuned[key] - start[key]).abs().max() < 0.02
    text = (out / "results.md").read_text()
    assert "| hf_folded | hf_folded | 32 | 64 | 1 | 2 | 8 | 8 |" in text  # the checkpoint's d_ff
    assert "| hf_rmt | hf_rmt | 32 |" in text

    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(foldformer.train, "train", no_training)
    monkeypatch.setattr("foldformer.compare.evaluate_model", no_training)
    assert main(["compare", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already trained") == 3
    assert len(load_records([out / "results.json"])) == len(records)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
def test_hugging_face_decoders_are_matched_in_parameters(workspace, family):
    config = load_compare_config(
        workspace / "micro.toml",
        {"compare.models": "folded,hf_folded,hf_rmt", "overrides.hf_folded.family": family,
         "overrides.hf_rmt.family": family, "overrides.hf_rmt.d_ff": "1024"},
    )  # fmt: skip
    target, plans = plan_models(config, vocab_size=257)
    for plan in plans[1:]:
        assert plan.values["family"] == family and plan.values["d_ff"] < 1024
        assert 0.9 <= plan.ratio <= 1.1 and abs(plan.parameters - target) <= 0.1 * target
        hf_config = plan.run_model_dict()["hf_config"]
        assert hf_config["model_type"] == family and hf_config["vocab_size"] == 257
    # the same d_ff without matching is refused by name before anything trains
    config = load_compare_config(
        workspace / "micro.toml",
        {"compare.models": "folded,hf_rmt", "compare.match_parameters": "false",
         "overrides.hf_rmt.family": family, "overrides.hf_rmt.d_ff": "1024"},
    )  # fmt: skip
    with pytest.raises(ParameterMismatchError, match="'hf_rmt' has"):
        plan_models(config, vocab_size=257)


def test_a_pretrained_decoder_of_another_size_is_refused_by_name(workspace):
    big = save_llama(workspace / "big", intermediate_size=1024)
    config = load_compare_config(
        workspace / "micro.toml",
        {"compare.models": "folded,hf_folded", "overrides.hf_folded.init_from": str(big)},
    )
    with pytest.raises(ParameterMismatchError, match=r"init_from='.*big' is a pretrained decoder"):
        plan_models(config, vocab_size=257)


HF_BAD = {
    "overrides.hf_folded.family=gpt5": "family='gpt5' is not supported; supported: ['gpt2'",
    "overrides.hf_folded.init_from={root}/none": "init_from='{root}/none' is not a Hugging Face",
    "overrides.hf_folded.famly=gpt2": "unknown HFBaselineConfig field(s) ['famly']",
    "overrides.hf_rmt.memory_len=0": "model 'hf_rmt': memory_len must be >= 1",
    "overrides.hf_folded.init_from={root}/small": "model 'hf_folded': vocab_size=257 is larger "
    "than the decoder's vocab_size=100",
    "overrides.hf_folded.init_from={root}/short": "a fold spans 16 positions",
}


@pytest.mark.parametrize("setting, message", sorted(HF_BAD.items()))
def test_a_bad_hugging_face_model_is_one_line_naming_the_value(workspace, capsys, setting, message):
    from foldformer.cli import console

    save_llama(workspace / "small", vocab_size=100)
    save_llama(workspace / "short", max_positions=12)
    capsys.readouterr()  # save_pretrained's progress bar
    out = workspace / "out"
    models = "folded,hf_folded,hf_rmt"
    argv = ["compare", str(workspace / "micro.toml"), "--out", str(out), "--models", models]
    assert console([*argv, "--set", setting.replace("{root}", str(workspace))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message.replace("{root}", str(workspace)) in err
    assert not (out / "models").exists()


def test_init_from_keeps_the_decoders_own_shape(workspace):
    llama = save_llama(workspace / "llama")
    with pytest.raises(ConfigError, match=r"sets \['d_model'\] next to init_from=.*brings its own"):
        load_compare_config(
            workspace / "micro.toml",
            {"overrides.hf_folded.init_from": str(llama), "overrides.hf_folded.d_model": "64"},
        )
