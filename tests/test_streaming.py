"""The segment driver (foldformer.streaming) for every model: the numbers of before it, the
DESIGN.md §3 invariants through it, its reset rule, and the attention-kernel table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_streams_like_one_call, embedding_grads, flat_grads
from foldformer.config import ConfigError, FoldedConfig
from foldformer.models import build_model, load_model
from foldformer.variants.peers import PEERS, peer_available

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import reference  # noqa: E402  (tests/fixtures/reference.py)

sys.path.remove(str(FIXTURES))

SHAPE = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2)
# every model type, w = 4, with a memory where it has one
MODELS = {
    "folded": ("folded", dict(memory_len=3)),
    "folded_gate": ("folded", dict(memory_len=3, memory_gate=True)),
    "sliding_window": ("sliding_window", dict(memory_len=0)),
    "transformer_xl": ("transformer_xl", dict(memory_len=3)),
    "rmt": ("rmt", dict(memory_len=3)),
    "peer_rmt": ("peer_rmt", dict(memory_len=2)),
    "peer_infini": ("peer_infini", dict(memory_len=0)),
    "peer_xl": ("peer_xl", dict(memory_len=3)),
    "peer_block_recurrent": ("peer_block_recurrent", dict(memory_len=2)),
}
PEER_NAMES = [name for name, (model_type, _) in MODELS.items() if model_type in PEERS]
# gradient from the last segment's loss reaches the first segment with full BPTT
CARRIES_GRADIENT = {"folded", "folded_gate", "rmt", "peer_rmt", "peer_infini"}


def make(name: str, **overrides):
    model_type, values = MODELS[name]
    if model_type in PEERS and not peer_available(model_type):
        pytest.skip(f"{PEERS[model_type].package} is not installed")
    torch.manual_seed(0)
    return build_model(model_type, {**SHAPE, "segment_len": 4, **values, **overrides}).double()


# -- the numbers of before the driver ----------------------------------------------------------


@pytest.fixture(scope="module")
def saved():
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "reference.safetensors"))


@pytest.mark.parametrize("name", list(reference.CASES))
def test_numbers_are_those_of_the_four_loops_before_the_driver(name, saved):
    """Logits (one call, logits_to_keep, after a carried state with resets), the loss and the
    gradients of a bptt=2, checkpointed step, from seeded initialisation: as 4ef0180 gave."""
    model_type, values = reference.CASES[name]
    if model_type in PEERS and not peer_available(model_type):
        pytest.skip(f"{PEERS[model_type].package} is not installed")
    for key, value in reference.outputs(reference.build(model_type, values)).items():
        torch.testing.assert_close(value, saved[f"{name}.{key}"], rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", list(reference.CHECKPOINTS))
def test_checkpoints_written_before_the_driver_load(name, saved):
    model = load_model(FIXTURES / "checkpoints" / name)
    logits = reference.checkpoint_logits(model)
    torch.testing.assert_close(logits, saved[f"checkpoint.{name}.logits"], rtol=0, atol=1e-12)
    assert model.config.attention == "sdpa"  # a field the files predate takes its default


# -- invariant 1: streaming equivalence, through the driver, for every model -------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_chunks_tokens_and_batch_composition_give_one_calls_logits(name):
    model = make(name).eval()
    ids = torch.randint(0, 32, (3, 19), generator=torch.Generator().manual_seed(0))
    assert_streams_like_one_call(model, ids)


# -- invariant 3: bounded memory state over 10^4 folds ------------------------------------------


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("folded")])
def test_state_stays_finite_and_of_constant_size_over_many_folds(name):
    """10^4 folds for the in-house models (the folded ones: tests/test_model.py); 500 for the
    peers, whose own modules cost tens of milliseconds a segment on a small CPU."""
    model = make(name).float().eval()
    calls = 2 if name in PEER_NAMES else 40  # calls x 250 folds of 4 tokens
    gen = torch.Generator().manual_seed(0)
    memory, sizes, norms = None, set(), []
    with torch.no_grad():
        for _ in range(calls):
            ids = torch.randint(0, 32, (1, 1000), generator=gen)
            memory = model(ids, memory, logits_to_keep=1).memory
            tensors = memory.state_dict()
            sizes.add(sum(t.numel() for t in tensors.values()))
            norms.append(max(t.float().norm().item() for t in tensors.values()))
    assert len(sizes) == 1, sizes
    assert all(torch.isfinite(torch.tensor(norms))), norms
    if name != "peer_infini":  # Infini-attention's memory is a running sum: it grows by design
        assert max(norms[calls // 2 :]) <= 2 * max(norms[: max(1, calls // 10)]), norms


# -- invariant 4: gradient through folds, and its truncation -----------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_crosses_folds_as_the_design_says_and_bptt_truncates_it(name):
    model = make(name).train()
    ids = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(0))  # 6 folds
    full = embedding_grads(model, ids, bptt=0)
    assert full[-1] > 0
    if name in CARRIES_GRADIENT:
        assert (full > 0).all(), full
        truncated = embedding_grads(model, ids, bptt=2)  # detached after folds 2 and 4
        assert (truncated[:4] == 0).all() and (truncated[4:] > 0).all(), truncated
    else:  # XL caches and windows: a stopped gradient or a bounded reach
        assert (full[:2] == 0).all(), full


@pytest.mark.parametrize("name", list(MODELS))
def test_per_segment_checkpointing_and_chunked_loss_give_the_same_gradients(name):
    ids = torch.randint(0, 32, (2, 14), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for checkpoint, return_logits in ((False, True), (True, False)):
        model = make(name).train()
        out = model(ids, labels=ids, checkpoint=checkpoint, return_logits=return_logits)
        assert (out.logits is None) != return_logits
        out.loss.backward()
        losses.append(out.loss)
        grads.append(flat_grads(model))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


# -- the reset rule: fold boundaries only, for every model -------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_a_reset_off_a_fold_boundary_is_an_error_naming_the_token(name):
    """It used to be ignored silently when it fell inside a fold of the chunk."""
    model = make(name).eval()
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6] = True  # folds of 4: tokens 0, 4, 8 are boundaries
    with pytest.raises(ValueError, match="token 6 of this chunk is not on one"):
        model(torch.zeros(2, 10, dtype=torch.long), reset_mask=mask)
    memory = model(torch.zeros(2, 3, dtype=torch.long)).memory  # 3 tokens of a fold read
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True  # token 1 completes the fold: a boundary
    model(torch.zeros(2, 5, dtype=torch.long), memory, reset_mask=mask)
    with pytest.raises(ValueError, match="token 0 of this chunk is not on one"):
        model(torch.zeros(2, 5, dtype=torch.long), memory, reset_mask=torch.tensor([True, False]))


def test_a_state_of_another_shape_is_named():
    model = make("transformer_xl")
    memory = make("transformer_xl", memory_len=2).initial_state(2)
    with pytest.raises(ValueError, match=r"memory has shape \(2, 2, 2, 16\), expected \(2, 2, 3"):
        model(torch.zeros(2, 3, dtype=torch.long), memory)
    with pytest.raises(ValueError, match="reset_mask must be a bool tensor"):
        model(torch.zeros(2, 3, dtype=torch.long), reset_mask=[True, False])


# -- the attention kernel, chosen in the config ------------------------------------------------

IN_HOUSE = ["folded", "folded_gate", "sliding_window", "transformer_xl", "rmt"]


@pytest.mark.parametrize("name", IN_HOUSE)
@pytest.mark.parametrize("attention", ["eager", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_every_attention_kernel_gives_the_sdpa_logits(name, attention):
    if attention == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")  # torch >= 2.5
    ids = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # FlexAttention has no CPU backward
        expected = make(name).eval()(ids).logits
        model = make(name, attention=attention).eval()
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-12)
        first = model(ids[:, :6])  # the cached (partial-fold) path too
        rest = model(ids[:, 6:], first.memory).logits
        torch.testing.assert_close(rest, expected[:, 6:], rtol=0, atol=1e-12)
    if attention == "eager":  # and the gradients, where the kernel has a backward
        grads = []
        for kernel in ("sdpa", "eager"):
            model = make(name, attention=kernel).train()
            model(ids, labels=ids).loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_attention_kernel_is_a_checked_config_field():
    with pytest.raises(ConfigError, match="attention='flash9' is not one of"):
        FoldedConfig(attention="flash9")
    with pytest.raises(ConfigError, match="attention='flex' has no dropout"):
        build_model("rmt", {"attention": "flex", "dropout": 0.1})
    # left out of the saved config at its default (files from before compare equal) ...
    assert "attention" not in FoldedConfig().to_dict()
    # ... kept otherwise, and read back
    config = FoldedConfig(attention="eager")
    assert FoldedConfig.from_json(config.to_json()) == config


def test_a_registered_kernel_is_used_by_the_model():
    from foldformer import layers

    calls = []

    def counting(q, k, v, mask=None, dropout_p=0.0):
        calls.append(q.shape)
        return layers.sdpa_attention(q, k, v, mask, dropout_p)

    layers.register_attention("counting_test", counting)
    try:
        model = make("folded", attention="counting_test").eval()
        model(torch.zeros(1, 8, dtype=torch.long))
        assert len(calls) == 2 * 2  # 2 folds x 2 layers
    finally:
        del layers.ATTENTION["counting_test"]
