"""The memory gates that can hold a channel exactly (docs/retrieval.md): the DESIGN.md §3
invariants for each gate option, the exact hold itself, and a tiny key-recall model that
recalls beyond the distance it was trained on."""

from __future__ import annotations

import pytest
import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.model import GATE_ACTIVATIONS, clamped_stretched_sigmoid

GATES = sorted(GATE_ACTIVATIONS)


pytestmark = pytest.mark.usefixtures("one_thread")


def gated(gate_activation: str, **values) -> FoldedTransformer:
    torch.manual_seed(0)
    config = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, segment_len=4, memory_len=4,
                  memory_gate=True, gate_activation=gate_activation)  # fmt: skip
    return FoldedTransformer(FoldedConfig(**{**config, **values})).double().eval()


@pytest.mark.parametrize("gate", GATES)
def test_streaming_equivalence_for_every_gate(gate):
    model = gated(gate, gate_bias=1.0)
    ids = torch.randint(0, 64, (3, 37), generator=torch.Generator().manual_seed(1))
    whole = model(ids).logits
    state, parts = None, []
    for chunk in ids.split([5, 1, 11, 4, 16], dim=1):
        out = model(chunk, state)
        state, parts = out.memory, parts + [out.logits]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-10, atol=1e-10)
    state, steps = None, []
    for t in range(ids.shape[1]):
        out = model.step(ids[:, t], state)
        state, steps = out.memory, steps + [out.logits]
    torch.testing.assert_close(torch.stack(steps, dim=1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gate", ["hardsigmoid", "clamp_st"])
def test_a_saturated_gate_holds_the_memory_exactly_through_any_number_of_folds(gate):
    model = gated(gate, gate_bias=50.0)  # every channel's g is exactly 1
    torch.nn.init.zeros_(model.memory_gate.linear.weight)
    ids = torch.randint(0, 64, (2, 4000), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = model(ids[:, :4]).memory.memory
        later = model(ids[:, 4:], model(ids[:, :4]).memory).memory.memory
    assert torch.equal(first, model.initial_memory.expand_as(first))  # the fold wrote nothing
    assert torch.equal(later, first)  # and 999 folds later nothing has moved


def test_clamp_st_passes_the_sigmoid_gradient_through_the_clamp():
    x = torch.tensor([-8.0, 0.0, 8.0], requires_grad=True)
    g = clamped_stretched_sigmoid(x)
    assert g[0].item() == 0.0 and g[2].item() == 1.0  # exactly shut, exactly open
    g.sum().backward()
    expected = 1.2 * torch.sigmoid(x.detach()) * (1 - torch.sigmoid(x.detach()))
    torch.testing.assert_close(x.grad, expected)
    assert (x.grad > 0).all()  # a held gate still learns (hardsigmoid's gradient is 0 there)


def test_unknown_gate_activation_is_named():
    from foldformer.config import ConfigError

    with pytest.raises(ConfigError, match="gate_activation='tanh'"):
        FoldedConfig(memory_gate=True, gate_activation="tanh")


# -- the retention levers (docs/retrieval.md "Levers") ----------------------------------------


def test_memory_noise_is_added_at_its_relative_scale_in_training_only():
    clean, noisy = gated("clamp_st"), gated("clamp_st", memory_noise=0.1)  # the same weights
    ids = torch.randint(0, 64, (16, 4), generator=torch.Generator().manual_seed(3))
    exact = clean.train()(ids).memory.memory
    moved = noisy.train()(ids).memory.memory - exact
    relative = moved.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()
    assert 0.09 < relative < 0.11  # 2,048 Gaussian draws of scale 0.1 x the row RMS
    assert torch.equal(noisy.eval()(ids).memory.memory, clean.eval()(ids).memory.memory)


@pytest.mark.parametrize("gate", [False, True])
def test_a_fifo_memory_carries_its_older_rows_unchanged(gate):
    model = gated("clamp_st", memory_gate=gate, memory_len=12, memory_fifo=True)  # 3 blocks
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        states = [model(ids[:, :4]).memory]
        for k in (1, 2):
            states.append(model(ids[:, 4 * k : 4 * k + 4], states[-1]).memory)
    first, second, third = (s.memory for s in states)
    assert torch.equal(second[:, :8], first[:, 4:])  # the oldest block left, the rest held
    assert torch.equal(third[:, :4], first[:, 8:])  # the first fold's block, two folds later
    assert not torch.equal(third[:, 8:], second[:, 8:])  # the newest block entered


def test_write_positions_write_the_memory_and_leave_the_segment_alone():
    model = gated("clamp_st", memory_write=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids)
        model.write_tokens.add_(1.0)
        after = model(ids)
    # causal: the write positions follow the segment, so the fold's own logits do not change
    torch.testing.assert_close(after.logits[:, :4], before.logits[:, :4], rtol=0, atol=0)
    assert not torch.allclose(after.logits[:, 4:], before.logits[:, 4:])  # the next fold reads
    assert not torch.allclose(after.memory.memory, before.memory.memory)  # what they wrote


def test_levers_are_off_by_default_and_absent_from_old_configs():
    names = ("memory_noise", "memory_fifo", "memory_write")
    assert not set(names) & set(FoldedConfig().to_dict())  # old config.json files compare equal
    assert "write_tokens" not in dict(gated("clamp_st").named_parameters())


@pytest.mark.parametrize(
    "values,message",
    [(dict(memory_noise=-0.1), "memory_noise must be a finite number >= 0, got -0.1"),
     (dict(memory_fifo=True), "memory_fifo needs memory_len > segment_len"),
     (dict(memory_len=16, memory_fifo=True, memory_write=True), "exclusive"),
     (dict(memory_len=0, memory_write=True), "memory_write needs memory_len >= 1"),
     (dict(memory_len=16, memory_gate=True), "memory_gate needs memory_len <= segment_len")],
)  # fmt: skip
def test_bad_lever_values_are_named(values, message):
    from foldformer.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        FoldedConfig(**{"segment_len": 8, "memory_len": 8, **values})


def test_a_tiny_holding_gate_recalls_four_times_beyond_its_training_distance(tmp_path):
    """Key recall (foldformer.demo) trained with the curriculum to 16 folds recalls the key at
    64 folds (4x) and mostly at 128 (8x). Measured with benchmarks/retention.py (docs/
    retrieval.md): seeds 0 and 1 gave 100% / 99% at 4x and 89% / 97% at 8x after 1,100 steps."""
    from foldformer.data.synthetic import evaluate_accuracy
    from foldformer.demo import KeyRecallTask
    from foldformer.models import load_model
    from foldformer.train import load_run_config, train

    overrides = {"max_steps": "1100", "seed": "0", "progress": "false", "eval_every": "0",
                 "save_every": "0", "log_every": "100", "warmup_steps": "0",
                 "min_lr_ratio": "1.0", "weight_decay": "0.0", "beta2": "0.999",
                 "gate_activation": "clamp_st"}  # fmt: skip
    run = load_run_config(preset="tiny", overrides=overrides)
    task = KeyRecallTask(run.train.batch_size, run.model["segment_len"], max_folds=16, seed=0,
                         window=128)  # fmt: skip
    train(run, tmp_path / "run", batch_source=task)
    assert task.level == 16  # the curriculum reached its top: trained to 16 folds
    model = load_model(tmp_path / "run" / "final").eval()
    assert evaluate_accuracy(model, task, 64, n_samples=128, batch_size=128) >= 0.95
    assert evaluate_accuracy(model, task, 128, n_samples=128, batch_size=128) >= 0.8
