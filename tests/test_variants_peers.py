"""PyPI peers behind the project protocol, and parameter matching across all baselines."""

from __future__ import annotations

import pytest
import torch

from foldformer.models import build_model, load_model
from foldformer.variants.baselines import (
    BASELINES,
    baseline_configs,
    config_values,
    count_parameters,
    match_parameters,
)
from foldformer.variants.peers import PEERS, PeerUnavailableError, peer_available, require_peer

TINY = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, segment_len=4)
PEER_MEMORY = {"peer_rmt": 2, "peer_infini": 0, "peer_xl": 3, "peer_block_recurrent": 2}


def build_peer(model_type: str):
    if not peer_available(model_type):
        pytest.skip(
            f"{PEERS[model_type].package} is not installed (pip install 'foldformer[peers]')"
        )
    torch.manual_seed(0)
    return build_model(model_type, {**TINY, "memory_len": PEER_MEMORY[model_type]})


@pytest.mark.parametrize("model_type", sorted(PEERS))
def test_peer_trains_a_step_streams_and_round_trips(model_type, tmp_path):
    model = build_peer(model_type).train()
    ids = torch.randint(0, 40, (2, 10))  # two segments and a half
    labels = torch.roll(ids, -1, dims=1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed >= len(before) // 2, f"only {changed} of {len(before)} parameters changed"

    model.eval()
    with torch.no_grad():
        whole = model(ids)
        assert whole.logits.shape == (2, 10, 40)
        assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 40)
        # chunked (the partial segment is re-read) and token by token equal one call
        first = model(ids[:, :6])
        joined = model.state_class.concat([first.memory.index([0]), first.memory.index([1])])
        rest = model(ids[:, 6:], joined)
        chunked = torch.cat([first.logits, rest.logits], dim=1)
        torch.testing.assert_close(chunked, whole.logits, rtol=1e-4, atol=1e-5)
        state, steps = None, []
        for t in range(10):
            step = model.step(ids[:, t], state)
            state, steps = step.memory, steps + [step.logits]
        torch.testing.assert_close(torch.stack(steps, 1), whole.logits, rtol=1e-4, atol=1e-5)
        # a row alone gives its logits in the batch
        torch.testing.assert_close(model(ids[1:]).logits[0], whole.logits[1], rtol=1e-4, atol=1e-5)
        # the state is read: changing a token of segment 1 changes segment 2's logits
        changed = ids.clone()
        changed[:, 1] = (ids[:, 1] + 1) % 40
        assert not torch.allclose(model(changed).logits[:, 4:8], whole.logits[:, 4:8])

    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, whole.logits, rtol=0, atol=0)
    assert 0 < model.num_parameters() < model.num_parameters(non_embedding=False)


def test_missing_peer_says_how_to_install_it():
    with pytest.raises(PeerUnavailableError, match=r"pip install 'foldformer\[peers\]'"):
        require_peer("no_such_peer_module_xyz", "no-such-peer", "peer_xyz")


# -- parameter matching ------------------------------------------------------------------------

BASE = dict(vocab_size=257, d_model=64, n_layers=2, n_heads=4, segment_len=16, memory_len=16)


def test_baseline_configs_name_every_baseline_with_its_memory():
    configs = baseline_configs(BASE, list(BASELINES))
    assert list(configs) == list(BASELINES)
    assert configs["no_memory"]["memory_len"] == 0
    assert configs["folded_gate"]["memory_gate"] and not configs["folded"]["memory_gate"]
    assert configs["folded_gate"]["memory_len"] == configs["folded"]["memory_len"] == 16
    assert configs["full_attention"]["segment_len"] == 10**9
    assert configs["sliding_window"]["memory_len"] == 0 and "fold_in" not in configs["rmt"]
    assert configs["transformer_xl"]["memory_len"] == 16
    for name, values in configs.items():  # each one is a valid config of its model type
        assert values["model_type"] == BASELINES[name][0]
        assert values["d_model"] == 64 and values["segment_len"] in (16, 10**9)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_configs(BASE, ["mamba"])


@pytest.mark.parametrize("model_type", ["folded", "sliding_window", "transformer_xl", "rmt"])
@pytest.mark.parametrize("target", [60_000, 400_000])  # d_ff alone, then d_model too
def test_match_parameters_lands_within_ten_percent(model_type, target):
    values = {**BASE, "memory_len": 0 if model_type == "sliding_window" else 16}
    matched, count = match_parameters(model_type, values, target)
    assert abs(count - target) <= 0.10 * target
    assert count == build_model(model_type, matched).num_parameters(non_embedding=True)
    assert count == count_parameters(model_type, matched)


def test_match_parameters_for_the_peers():
    configs = baseline_configs(BASE, list(BASELINES))
    target = count_parameters("folded", configs["folded"])
    for name in ("peer_rmt", "peer_infini", "peer_xl", "peer_block_recurrent"):
        if not peer_available(name):
            continue
        matched, count = match_parameters(name, config_values(configs[name]), target)
        assert abs(count - target) <= 0.10 * target, (name, count, target)


def test_match_parameters_explains_an_impossible_target():
    with pytest.raises(ValueError, match="cannot bring rmt within"):
        match_parameters("rmt", {**BASE, "n_layers": 8}, 50)
