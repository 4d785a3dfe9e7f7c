"""foldformer.explain: path amplitude through the folds, and `foldformer explain`."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

from foldformer.cli import console
from foldformer.config import ConfigError, FoldedConfig
from foldformer.explain import Explainer, explain
from foldformer.model import FoldedTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def folded(**shape) -> FoldedTransformer:
    torch.manual_seed(0)
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, segment_len=4, memory_len=3)
    return FoldedTransformer(FoldedConfig(**{**base, **shape})).eval()


def uniform_attention(model: FoldedTransformer, gate_bias=0.0) -> FoldedTransformer:
    """q = k = 0: every attention row is uniform over the positions it may see; a gate with
    no weights is sigmoid(gate_bias) (a number or one per channel) in every row and fold."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.config.d_model].zero_()
        if model.memory_gate is not None:
            model.memory_gate.linear.weight.zero_()
            model.memory_gate.linear.bias.copy_(torch.as_tensor(gate_bias))
    return model


def reference_amplitudes(config: FoldedConfig, n_tokens: int, g: np.ndarray) -> np.ndarray:
    """Uniform attention, by brute force: carry every memory row's amplitude over
    [M0, token 0, …] for the whole history (what explain avoids), channel by channel with
    gate values g (C,), and read each position's, averaged over the channels.
    Returns (n_tokens, 1 + n_tokens): raw amplitude of each position, column 0 = M0."""
    m, w, L = config.memory_len, config.segment_len, config.n_layers
    g = g[:, None, None]
    memory = np.zeros((len(g), m, 1 + n_tokens))
    memory[..., 0] = 1  # every row of M0 is M0
    rows = np.zeros((n_tokens, 1 + n_tokens))
    for start in range(0, n_tokens, w):
        n = min(w, n_tokens - start)
        F = m + n
        attention = np.tril(np.ones((F, F))) / np.arange(1, F + 1)[:, None]
        rollout = np.linalg.matrix_power(0.5 * np.eye(F) + 0.5 * attention, L)
        inputs = np.zeros((len(g), F, 1 + n_tokens))  # each fold input over [M0, tokens]
        inputs[:, :m] = memory
        inputs[:, m + np.arange(n), 1 + start + np.arange(n)] = 1
        states = rollout @ inputs
        rows[start : start + n] = states[:, m:].mean(0)
        if n == w and m:
            new = states[:, F - m :]
            memory = g * memory + (1 - g) * new if config.memory_gate else new
    return rows


def test_two_folds_of_known_attention_give_known_amplitudes():
    # m = 1, w = 2, one layer, uniform attention: fold rollout rows ½I + ½A are
    # [1, 0, 0], [1/4, 3/4, 0], [1/6, 1/6, 2/3]; the next memory is the last row.
    # Token 3 = 1/6 memory + 1/6 token 2 + 2/3 token 3, memory = 1/6 M0 + 1/6 t0 + 2/3 t1.
    shape = dict(n_layers=1, n_heads=1, d_model=4, segment_len=2, memory_len=1)
    expected = {  # (amplitude over tokens 0..3 before normalising, share ending in M0)
        False: ([Fraction(1, 36), Fraction(4, 36), Fraction(6, 36), Fraction(24, 36)], 1 / 36),
        # gate g = 1/2: memory = 1/2 M0 + 1/2 (1/6 M0 + 1/6 t0 + 2/3 t1)
        True: ([Fraction(1, 72), Fraction(4, 72), Fraction(12, 72), Fraction(48, 72)], 7 / 72),
    }
    for gated, (raw, initial) in expected.items():
        model = uniform_attention(folded(**shape, memory_gate=gated))
        (record,) = explain(model, [5, 6, 7, 8], positions=[3])
        total = sum(raw)
        assert record.amplitude.tolist() == pytest.approx([float(a / total) for a in raw], 1e-6)
        assert record.initial_memory == pytest.approx(initial, abs=1e-6)


@pytest.mark.parametrize(
    "shape, gate",
    [
        (dict(segment_len=4, memory_len=3, memory_gate=False), "mean"),
        (dict(segment_len=3, memory_len=5, memory_gate=False), "mean"),  # m > w: a FIFO
        (dict(segment_len=4, memory_len=2, memory_gate=True, n_layers=3), "mean"),
        (dict(segment_len=4, memory_len=2, memory_gate=True, n_layers=3), "channels"),
    ],
)
def test_walking_back_through_the_transfers_matches_carrying_the_whole_history(shape, gate):
    bias = torch.linspace(-3, 3, 16)  # a gate that keeps some channels far more than others
    model = uniform_attention(folded(**shape), gate_bias=bias)
    n_tokens = 19  # five folds, the last one partial
    records = explain(model, torch.arange(n_tokens) % 32, range(n_tokens), gate=gate)
    g = torch.sigmoid(bias).double().numpy()
    g = g if gate == "channels" else g.mean(keepdims=True)
    reference = reference_amplitudes(model.config, n_tokens, g)
    for record, raw in zip(records, reference, strict=True):
        tokens = raw[1 : record.position + 2]
        assert record.amplitude.numpy() == pytest.approx(tokens / tokens.sum(), abs=1e-6)
        assert record.initial_memory == pytest.approx(raw[0], abs=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_every_row_sums_to_one(gated):
    model = folded(memory_gate=gated)
    ids = torch.randint(0, 32, (30,), generator=torch.Generator().manual_seed(1))
    for heads in ("mean", "keep"):
        for record in explain(model, ids, range(0, 30, 3), heads=heads):
            assert record.amplitude.shape == (record.position + 1,)
            assert record.amplitude.sum().item() == pytest.approx(1, abs=1e-9)
            assert (record.amplitude >= 0).all()
            assert 0 < record.initial_memory < 1
            if heads == "keep":
                assert record.heads.shape == (2, record.position + 1)
                assert record.heads.sum(-1).tolist() == pytest.approx([1, 1], abs=1e-9)


def test_without_memory_nothing_reaches_before_the_current_fold():
    model = folded(memory_len=0)
    ids = torch.randint(0, 32, (17,), generator=torch.Generator().manual_seed(2))
    for record in explain(model, ids, range(17), heads="keep"):
        fold_start = record.position // 4 * 4
        assert not record.amplitude[:fold_start].any()
        assert not record.heads[:, :fold_start].any()
        assert record.amplitude[fold_start:].sum().item() == pytest.approx(1, abs=1e-9)
        assert record.initial_memory == 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_chunked_streaming_gives_the_same_amplitudes_and_the_models_own_state(attention):
    model = folded(memory_gate=True, attention=attention)
    ids = torch.randint(0, 32, (27,), generator=torch.Generator().manual_seed(3))
    positions = [0, 2, 3, 9, 16, 26]
    whole = explain(model, ids, positions, heads="keep")
    explainer = Explainer(model, positions, heads="keep")
    for chunk in ids.split([1, 2, 6, 5, 1, 12]):
        explainer.read(chunk)
    for a, b in zip(whole, explainer.amplitudes(), strict=True):
        assert a.position == b.position
        torch.testing.assert_close(a.amplitude, b.amplitude, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.heads, b.heads, atol=1e-6, rtol=0)
    # the explainer read the stream through the model's own steps: the same state comes out
    with torch.no_grad():
        state = model(ids[None]).memory
    torch.testing.assert_close(explainer.state.memory, state.memory)
    torch.testing.assert_close(explainer.state.top, state.top)
    assert all(block.attn.kernel.__name__ == f"{attention}_attention" for block in model.blocks)


def test_horizon_is_the_distance_holding_the_share():
    model = uniform_attention(folded(n_layers=1, memory_len=0, segment_len=8))
    (record,) = explain(model, list(range(8)), [7])
    # one layer, 8 visible tokens: self 1/2 + 1/16, every other token 1/16
    assert record.by_distance().tolist() == pytest.approx([9 / 16] + [1 / 16] * 7)
    assert [record.horizon(s) for s in (0.5, 9 / 16, 0.6, 0.9, 1.0)] == [0, 0, 1, 6, 7]


def test_bad_input_is_a_config_error_naming_it(tmp_path):
    from foldformer.models import build_model

    xl = build_model("transformer_xl", dict(vocab_size=32, d_model=16, n_heads=2))
    with pytest.raises(ConfigError, match="'transformer_xl' model .* not supported"):
        Explainer(xl, [0])
    with pytest.raises(ConfigError, match="heads='all'"):
        Explainer(folded(), [0], heads="all")
    with pytest.raises(ConfigError, match="got -1"):
        Explainer(folded(), [3, -1])
    with pytest.raises(ConfigError, match="position 5 is past the end of the text"):
        explain(folded(), [1, 2, 3], [5])
    with pytest.raises(ValueError, match="token id 99 is out of range"):
        explain(folded(), [1, 99], [1])


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def run(capsys, *argv) -> tuple[int, str, str]:
    code = console(["explain", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


TEXT = "The key is 731. " + "Filler text, café and naïve, goes on. " * 3 + "The key is?"


def test_explain_writes_records_plot_and_page(tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    n_tokens = len(TEXT.encode())
    code, out, err = run(capsys, tiny_checkpoint, "--text-file", text, "--positions", 5, -1,
                         "--out", tmp_path / "out", "--heads", "keep", "--gate", "channels")  # fmt: skip
    assert code == 0, err
    assert "position 5:" in out and f"position {n_tokens - 1}:" in out
    records = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert [r["position"] for r in records] == [5, n_tokens - 1]
    for r in records:
        assert len(r["amplitude"]) == r["position"] + 1
        assert sum(r["amplitude"]) == pytest.approx(1)
        assert set(r["horizon"]) == {"50%", "90%", "99%"}
        assert len(r["heads"]) == 2
    assert (tmp_path / "out" / "amplitude.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "out" / "explain.html").read_text()
    assert page.count("<section") == 2 and ">é</span>" in page and "<script" not in page


def test_explain_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys):
    text, empty = tmp_path / "text.txt", tmp_path / "empty.txt"
    text.write_text("hello")
    empty.write_text("")
    from foldformer.models import build_model

    xl = tmp_path / "xl"
    build_model("transformer_xl", dict(vocab_size=257, d_model=16, n_heads=2)).save_pretrained(xl)
    (xl / "tokenizer_config.json").write_text('{"type": "bytes"}\n')
    out = ("--out", tmp_path / "out")
    cases = [
        ((tiny_checkpoint, "--text-file", tmp_path / "none.txt", *out), "none.txt"),
        ((tiny_checkpoint, "--text-file", text, "--positions", 5, *out), "--positions 5"),
        ((tiny_checkpoint, "--text-file", text, "--positions", -6, *out), "--positions -6"),
        ((tiny_checkpoint, "--text-file", empty, *out), "holds no tokens"),
        ((xl, "--text-file", text, *out), "'transformer_xl'"),
        ((tmp_path / "no_model", "--text-file", text, *out), "no_model"),
    ]
    for argv, named in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and named in err, err
        assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------
# The page, rendered in a real browser
# ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs it)")
def test_the_page_shades_the_text_in_headless_chromium(tmp_path, capsys):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra)")
    from foldformer.data.tokenizers import ByteTokenizer

    directory = tmp_path / "model"
    folded(vocab_size=257, memory_len=0, segment_len=16).save_pretrained(directory)
    ByteTokenizer().save(directory)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    last = len(TEXT.encode()) - 1
    assert run(capsys, directory, "--text-file", text, "--positions", 20, last,
               "--out", tmp_path / "out")[0] == 0  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto((tmp_path / "out" / "explain.html").as_uri())
        spans = page.eval_on_selector_all(
            f'section[data-position="{last}"] span',
            """spans => spans.map(s => ({first: +s.dataset.first, amplitude: +s.dataset.amplitude,
                 text: s.textContent, shown: s.getBoundingClientRect().width > 0,
                 background: getComputedStyle(s).backgroundColor}))""",
        )
        sections = page.locator("section").count()
        browser.close()
    assert sections == 2
    assert "".join(s["text"] for s in spans) == TEXT  # every piece, "é" and "ï" whole
    assert all(s["shown"] for s in spans if s["text"].strip())
    fold_start = last // 16 * 16  # m = 0: nothing before the fold is shaded
    for s in spans:
        if s["first"] < fold_start:
            assert s["amplitude"] == 0 and s["background"] == "rgba(0, 0, 0, 0)"
        else:
            assert s["amplitude"] > 0 and s["background"].startswith(
                ("rgb(230, 80, 20", "rgba(230, 80, 20")
            )
    brightest = max(spans, key=lambda s: s["amplitude"])
    assert brightest["background"] == "rgb(230, 80, 20)"  # alpha 1
