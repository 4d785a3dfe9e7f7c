"""The invariants of DESIGN.md §3, one test (or a few) each."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import embedding_grads
from foldformer import ConfigError, FoldedConfig, FoldedTransformer, FoldState


def make_model(**overrides) -> FoldedTransformer:
    values = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, segment_len=4, memory_len=3)
    values.update(overrides)
    torch.manual_seed(0)
    return FoldedTransformer(FoldedConfig(**values)).double().eval()


SHAPES = [
    dict(segment_len=4, memory_len=3),  # m < w: condenses harder
    dict(segment_len=4, memory_len=4),  # m = w: the note's set-up
    dict(segment_len=3, memory_len=7),  # m > w: FIFO, states re-evolved over several folds
    dict(segment_len=4, memory_len=0),  # independent segments
    dict(segment_len=64, memory_len=0),  # w >= T: plain full-attention GPT
    dict(segment_len=4, memory_len=4, fold_in="norm_linear", norm="layernorm"),
    dict(segment_len=4, memory_len=4, activation="swiglu", learned_initial_memory=False),
    dict(segment_len=4, memory_len=3, memory_gate=True),
    # the retention levers (docs/retrieval.md)
    dict(segment_len=3, memory_len=7, memory_fifo=True, memory_gate=True),  # FIFO, held rows
    dict(segment_len=4, memory_len=3, memory_write=True, memory_gate=True),  # write positions
    dict(segment_len=4, memory_len=4, memory_noise=0.5),  # noise is training-only
]


def stream(model, ids, sizes, memory=None):
    logits = []
    for chunk in ids.split(sizes, dim=1):
        out = model(chunk, memory)
        memory = out.memory
        logits.append(out.logits)
    return torch.cat(logits, dim=1), memory


# -- 1. streaming equivalence ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_chunked_and_token_by_token_match_one_call(shape):
    model = make_model(**shape)
    ids = torch.randint(0, 50, (3, 29))
    whole = model(ids)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # random chunkings, boundaries anywhere inside folds
        cuts = sorted(torch.randperm(28, generator=gen)[:5].add(1).tolist())
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [29], strict=True)]
        chunked, memory = stream(model, ids, sizes)
        torch.testing.assert_close(chunked, whole.logits, rtol=0, atol=1e-10)
        torch.testing.assert_close(memory.memory, whole.memory.memory, rtol=0, atol=1e-10)
    state, steps = None, []
    for t in range(ids.shape[1]):
        out = model.step(ids[:, t], state)
        state = out.memory
        steps.append(out.logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole.logits, rtol=0, atol=1e-10)


def test_row_logits_do_not_depend_on_other_rows():
    model = make_model()
    ids = torch.randint(0, 50, (4, 21))
    batched = model(ids).logits
    for row in range(4):
        alone = model(ids[row : row + 1]).logits
        torch.testing.assert_close(alone[0], batched[row], rtol=0, atol=1e-10)
    # ... also when the state is split by row mid-stream, inside a fold
    first = model(ids[:, :6])
    for row in range(4):
        rest = model(ids[row : row + 1, 6:], first.memory.index([row])).logits
        torch.testing.assert_close(rest[0], batched[row, 6:], rtol=0, atol=1e-10)


def test_float32_streaming_matches_to_float_tolerance():
    model = make_model().float()
    ids = torch.randint(0, 50, (2, 40))
    chunked, _ = stream(model, ids, [1, 9, 13, 17])
    torch.testing.assert_close(chunked, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_reset_mask_restarts_rows_from_initial_memory():
    model = make_model()
    history, fresh = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    state = model(history).memory
    out = model(fresh, state, reset_mask=torch.tensor([True, False]))
    alone = model(fresh).logits
    torch.testing.assert_close(out.logits[0], alone[0], rtol=0, atol=1e-10)
    assert not torch.allclose(out.logits[1], alone[1])
    # a (B, T) mask resets before token t: the same as a fresh stream from t
    ids = torch.cat([history, fresh], dim=1)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 8] = True
    out = model(ids, reset_mask=mask)
    torch.testing.assert_close(out.logits[0, 8:], alone[0], rtol=0, atol=1e-10)


def test_reset_inside_a_fold_is_refused():
    model = make_model()
    state = model(torch.randint(0, 50, (2, 6))).memory  # 2 of 4 tokens of a fold read
    with pytest.raises(ValueError, match="fold boundary"):
        model(torch.randint(0, 50, (2, 3)), state, reset_mask=torch.tensor([True, False]))


# -- 2. constant inference memory --------------------------------------------------------------

PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from foldformer import FoldedConfig, FoldedTransformer
    torch.manual_seed(0)
    segment_len, memory_len, n_tokens = (int(a) for a in sys.argv[1:])
    config = FoldedConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4,
                          segment_len=segment_len, memory_len=memory_len)
    model = FoldedTransformer(config).eval()
    ids = torch.randint(0, 64, (1, 256))
    state = None
    with torch.no_grad():
        for _ in range(n_tokens // 256):
            state = model(ids, state, logits_to_keep=1).memory
    # VmHWM: this process's own peak. ru_maxrss would also count the forked parent's pages
    # (Linux keeps the pre-exec high-water mark), i.e. the size of the test process.
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
    """
)


def peak_rss_kib(segment_len: int, memory_len: int, n_tokens: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(segment_len), str(memory_len), str(n_tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_peak_memory_does_not_grow_with_length():
    short = peak_rss_kib(64, 64, 1_024)
    long = peak_rss_kib(64, 64, 102_400)  # 100x longer stream
    assert long <= short + 8 * 1024, f"peak RSS grew from {short} KiB to {long} KiB"
    # Control: the measurement sees growth where there is some. Full attention (w >= T)
    # caches keys/values of every token: 2 layers x 2 x 64 floats = 1 KiB a token.
    growing = peak_rss_kib(10**9, 0, 65_536)
    assert growing >= short + 32 * 1024, f"full attention peaked at {growing} KiB ({short} short)"


# -- 3. bounded memory state -------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [dict(), dict(fold_in="norm_linear", norm="layernorm"),
     dict(memory_gate=True, gate_activation="sigmoid"),
     dict(memory_gate=True, gate_activation="hardsigmoid"),
     dict(memory_gate=True, gate_activation="clamp_st"),
     dict(memory_gate=True, gate_activation="clamp_st", memory_len=8, memory_fifo=True),
     dict(memory_gate=True, gate_activation="clamp_st", memory_write=True)],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "plain",
)  # fmt: skip
@pytest.mark.usefixtures("one_thread")  # 10^4 tiny folds: threads only oversubscribe the cores
def test_memory_norms_stay_bounded_over_ten_thousand_folds(values):
    torch.manual_seed(0)
    config = FoldedConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                    segment_len=4, memory_len=4), **values})  # fmt: skip
    model = FoldedTransformer(config).eval()
    state, norms = None, []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(100):  # 100 calls x 100 folds = 10,000 folds
            ids = torch.randint(0, 64, (4, 400), generator=gen)
            state = model(ids, state, logits_to_keep=1).memory
            norms.append(state.memory.norm(dim=-1).max().item())
    norms = torch.tensor(norms)
    assert torch.isfinite(norms).all()
    assert norms[-50:].max() <= 2 * norms[:5].max(), norms


# -- 4. gradient through folds -----------------------------------------------------------------


def test_full_bptt_reaches_the_first_fold():
    model = make_model(segment_len=4, memory_len=4).train()
    ids = torch.randint(0, 50, (2, 32))  # 8 folds
    grads = embedding_grads(model, ids, bptt=0)
    assert (grads > 0).all(), grads


@pytest.mark.parametrize("bptt", [1, 3])
def test_truncated_bptt_stops_gradient(bptt):
    model = make_model(segment_len=4, memory_len=4).train()
    ids = torch.randint(0, 50, (2, 36))  # 9 folds: the last one is fold 8
    grads = embedding_grads(model, ids, bptt=bptt)
    window_start = (8 // bptt) * bptt  # the memory is detached every `bptt` folds
    assert (grads[:window_start] == 0).all(), grads
    assert (grads[window_start:] > 0).all(), grads


def test_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 50, (2, 24))
    grads = []
    for checkpoint in (False, True):
        model = make_model().train()
        model(ids, labels=ids, checkpoint=checkpoint).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


# -- persistence, configuration and errors -----------------------------------------------------


def test_save_and_load_give_identical_logits(tmp_path):
    model = make_model(tie_embeddings=False).float()
    ids = torch.randint(0, 50, (2, 19))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = FoldedTransformer.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model()
    ids = torch.randint(0, 50, (2, 14))
    state = model(ids[:, :7]).memory  # mid-fold: the cache is part of the state
    save_file(state.state_dict(), tmp_path / "state.safetensors")
    loaded = FoldState.from_state_dict(load_file(tmp_path / "state.safetensors"))
    torch.testing.assert_close(model(ids[:, 7:], loaded).logits, model(ids).logits[:, 7:])


def test_config_round_trips_through_json():
    config = FoldedConfig(d_model=48, n_heads=6, fold_in="norm_linear", memory_len=0)
    assert FoldedConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["d_ff"] == 192


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
        (dict(segment_len=0), "segment_len must be a positive integer, got 0"),
        (dict(memory_len=-1), "memory_len must be an integer >= 0, got -1"),
        (dict(fold_in="gate"), "fold_in='gate' is not one of"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_bad_config_names_the_value(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FoldedConfig(**values)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="d_modle"):
        FoldedConfig.from_dict({"d_modle": 3})


@pytest.mark.parametrize(
    "make_input,error,message",
    [
        (lambda: torch.tensor([[1, 2, 50]]), ValueError, "token id 50 is out of range"),
        (lambda: torch.tensor([[1, -1]]), ValueError, "token id -1 is out of range"),
        (lambda: torch.rand(1, 5), TypeError, "integer token ids, got dtype torch.float32"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
        (lambda: torch.tensor([1, 2, 3]), ValueError, r"shape \(batch, length\)"),
    ],
)
def test_bad_input_is_explained(make_input, error, message):
    with pytest.raises(error, match=message):
        make_model()(make_input())


def test_wrong_memory_shape_is_explained():
    model = make_model()
    state = model(torch.randint(0, 50, (3, 4))).memory
    with pytest.raises(ValueError, match=r"memory has shape \(3, 3, 32\), expected"):
        model(torch.randint(0, 50, (2, 4)), state)


# -- the memory carries information: a learning test -------------------------------------------


def recall_batch(batch_size: int, n_folds: int, gen: torch.Generator, w: int = 8):
    """A key (0..7) at position 0, random filler (10..41), a query token (8) last."""
    ids = torch.randint(10, 42, (batch_size, n_folds * w), generator=gen)
    key = torch.randint(0, 8, (batch_size,), generator=gen)
    ids[:, 0], ids[:, -1] = key, 8
    labels = torch.full_like(ids, -100)
    labels[:, -1] = key
    return ids, labels


def train_recall(memory_len: int) -> float:
    """Curriculum over the distance; returns accuracy with the key 4 folds back."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = FoldedConfig(
        vocab_size=42, d_model=64, n_layers=2, n_heads=4, segment_len=8, memory_len=memory_len
    )
    model = FoldedTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    max_folds = 1
    for _ in range(250):
        n_folds = int(torch.randint(1, max_folds + 1, (1,), generator=gen))
        ids, labels = recall_batch(32, n_folds, gen)
        out = model(ids, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        accuracy = (out.logits[:, -1].argmax(-1) == labels[:, -1]).float().mean()
        if n_folds == max_folds and accuracy > 0.9:
            max_folds = min(max_folds + 1, 6)
    ids, labels = recall_batch(512, 5, gen)  # key in fold 0, query in fold 4
    with torch.no_grad():
        predictions = model.eval()(ids).logits[:, -1].argmax(-1)
    return (predictions == labels[:, -1]).float().mean().item()


def test_memory_carries_a_token_across_four_folds():
    folded = train_recall(memory_len=8)
    no_memory = train_recall(memory_len=0)
    assert folded >= 0.6, f"folded model recalled {folded:.1%} (chance 12.5%)"
    assert no_memory <= 0.2, f"m = 0 model recalled {no_memory:.1%} (chance 12.5%)"


def test_chunked_loss_matches_full_logits_loss_and_gradients():
    model = make_model(vocab_size=50).train()
    ids, labels = torch.randint(0, 50, (3, 22)), torch.randint(0, 50, (3, 22))
    labels[0, :7] = -100
    full = model(ids, labels=labels)
    full.loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hidden_calls = []
    original = model.chunked_loss
    model.chunked_loss = lambda h, y: (
        hidden_calls.append(1),
        original(h, y, max_elements=3 * 50 * 4),
    )[1]
    chunked = model(ids, labels=labels, return_logits=False, checkpoint=True)
    assert chunked.logits is None and hidden_calls
    # the loss is computed in float32 (logits.float()), summed in another order: fp32 tolerance
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
    chunked.loss.backward()
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_the_loss_is_computed_in_float32_or_the_model_dtype_if_wider():
    """bf16 logits are upcast for the loss; float64 ones are not cast down (a float64 model's
    loss and gradients would otherwise carry float32 rounding, which differs between CPUs)."""
    from foldformer.streaming import language_model_loss

    labels = torch.tensor([[1, 2, -100]])
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        assert language_model_loss(torch.randn(1, 3, 5, dtype=dtype), labels).dtype == expected
    config = FoldedConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, segment_len=4,
                          memory_len=3)  # fmt: skip
    model = FoldedTransformer(config).double()
    ids = torch.randint(0, 32, (2, 9))
    for return_logits in (True, False):  # the plain loss and the chunked one
        out = model(ids, labels=ids, return_logits=return_logits)
        assert out.loss.dtype == torch.float64
