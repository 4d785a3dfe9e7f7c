"""Effective context length: the statistics on synthetic curves, and a real measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.evaluate.ecl import (
    WINDOW,
    distance_grid,
    effective_context_length,
    evaluate_ecl,
    paired_bootstrap,
    select_targets,
    unrelated_contexts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distance_grid_doubles_from_w_up_to_d_max():
    assert distance_grid(12, 200) == [0, 12, 24, 48, 96, 192]
    assert distance_grid(8, 64) == [0, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="below the grid unit"):
        distance_grid(64, 32)


def synthetic_losses(gains, n=400, noise=0.3, seed=0):
    """Per-target losses whose step gains average exactly `gains`, with per-target noise."""
    rng = np.random.default_rng(seed)
    base = 3.0 + rng.normal(0, 1.0, n)  # targets differ a lot: pairing removes this
    curve = [base]
    for gain in gains:
        step_noise = rng.normal(0, noise, n)
        curve.append(curve[-1] - gain + step_noise - step_noise.mean())
    return np.stack(curve)


def test_ecl_is_the_farthest_significant_step():
    d = [0, 8, 16, 32, 64, 128]
    # clear gains up to 32, nothing after: ECL 32
    result = effective_context_length(d, synthetic_losses([0.5, 0.3, 0.2, 0.0, 0.0]))
    assert result.ecl == 32
    assert result.ecl_interval[0] <= 32 <= result.ecl_interval[1]
    assert (
        result.step_interval[0][0] > 0
        and result.step_interval[3][0] < 0 < result.step_interval[3][1]
    )
    # a gain that shows only far away still counts (the largest d_i whose step is significant)
    assert effective_context_length(d, synthetic_losses([0.4, 0, 0, 0.3, 0])).ecl == 64
    # more context never helps: ECL 0
    flat = effective_context_length(d, synthetic_losses([0, 0, 0, 0, 0]))
    assert flat.ecl == 0
    # more context hurts: still 0 (only improvements count)
    assert effective_context_length(d, synthetic_losses([-0.3] * 5)).ecl == 0


def test_min_gain_ignores_clear_but_negligible_gains():
    d = [0, 8, 16]
    losses = synthetic_losses([0.5, 0.0])
    losses[2] = losses[1] - 1e-6 * (1 + np.random.default_rng(0).random(losses.shape[1]))
    assert effective_context_length(d, losses).ecl == 16  # DESIGN.md: any clear gain counts
    assert effective_context_length(d, losses, min_gain=1e-4).ecl == 8


def test_pairing_detects_small_gains_that_unpaired_comparison_would_miss():
    d = [0, 8]
    losses = synthetic_losses([0.05], n=500, noise=0.05)  # target spread 1.0 >> gain 0.05
    result = effective_context_length(d, losses)
    assert result.ecl == 8
    low, high = result.step_interval[0]
    # percentile bootstrap of a mean ≈ mean ± 1.96·sd/√n
    diff = losses[0] - losses[1]
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert low == pytest.approx(diff.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(diff.mean() + half, abs=0.25 * half)
    # the interval of the loss itself is wide: unpaired intervals would overlap
    assert result.loss_interval[0][0] < result.loss_interval[1][1]


def test_paired_bootstrap_is_reproducible_and_shares_resamples():
    diffs = np.random.default_rng(1).normal(0.1, 1, (2, 50))
    a = paired_bootstrap(diffs, 500, seed=3)
    assert np.array_equal(a, paired_bootstrap(diffs, 500, seed=3))
    same = paired_bootstrap(np.stack([diffs[0], diffs[0]]), 500, seed=3)
    assert np.array_equal(same[0], same[1])


def test_select_targets_deep_enough_inside_and_disjoint():
    docs = [np.arange(500), np.arange(100), np.arange(2000)]
    targets = select_targets(docs, 20, max_distance=200, seed=0)
    assert targets == select_targets(docs, 20, max_distance=200, seed=0)
    assert len(targets) == 20 and all(doc != 1 for doc, _ in targets)  # doc 1 is too short
    for doc, start in targets:
        assert start >= 200 and start + WINDOW <= len(docs[doc])
    for (d1, s1), (d2, s2) in zip(targets, targets[1:], strict=False):
        assert d1 != d2 or s2 - s1 >= WINDOW
    with pytest.raises(ValueError, match="longest: 100 tokens"):
        select_targets([np.arange(100)], 1, max_distance=200)


# -- a real measurement ------------------------------------------------------------------------

PERIOD, VOCAB = 24, 16


def periodic(batch, length, generator):
    """Random blocks of PERIOD tokens repeated: token t equals token t - PERIOD."""
    block = torch.randint(0, VOCAB, (batch, PERIOD), generator=generator)
    return block.repeat(1, length // PERIOD + 1)[:, :length]


@pytest.fixture(scope="module")
def copy_model():
    """A full-attention model trained (about a second) to copy the token PERIOD back."""
    torch.manual_seed(0)
    config = FoldedConfig(
        vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, segment_len=10**9, memory_len=0
    )
    model = FoldedTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        x = periodic(16, 97, generator)
        loss = model(x[:, :-1], labels=x[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.9  # the floor is (PERIOD/96)·ln 16 ≈ 0.69: it learned to copy
    docs = [periodic(1, 1000, generator)[0].numpy() for _ in range(8)]
    return model.eval(), docs


def test_ecl_of_a_model_using_far_context(copy_model):
    """A target token is predictable iff the token PERIOD = 24 back is read. At d = 0 the first
    23 window tokens are not; d = 8 and 16 each make 8 more predictable; from d = 32 all are.
    So the measured ECL must be 32 (> w = 8) and loss_32 ≈ loss_64."""
    model, docs = copy_model
    result = evaluate_ecl(model, docs, n_targets=48, max_distance=64, unit=8, progress=False)
    assert result.distances == [0, 8, 16, 32, 64]
    assert result.ecl == 32
    assert result.mean_loss[0] > result.mean_loss[1] > result.mean_loss[2] > result.mean_loss[3]
    assert result.mean_loss[3] < 0.2


def test_ecl_of_the_same_weights_without_memory_is_at_most_w(copy_model):
    """The same network read in independent segments of w = 8 (m = 0) cannot see before the
    window (which starts on a fold boundary), so context never helps: ECL = 0 <= w."""
    model, docs = copy_model
    no_memory = FoldedTransformer(model.config.replace(segment_len=8)).eval()
    no_memory.load_state_dict(model.state_dict())
    result = evaluate_ecl(no_memory, docs, n_targets=48, max_distance=64, progress=False)
    assert result.extra["unit"] == 8
    assert result.ecl <= 8
    assert np.ptp(result.mean_loss) < 1e-5


def test_unrelated_contexts_share_no_tokens_and_are_used_once():
    targets = [(0, 100), (0, 300), (1, 80), (2, 90), (2, 400), (3, 70)]
    perm = unrelated_contexts(targets, max_distance=50)
    assert sorted(perm.tolist()) == list(range(len(targets)))  # each context used once
    for i, j in enumerate(perm):
        (doc_i, start_i), (doc_j, start_j) = targets[i], targets[j]
        assert doc_i != doc_j or abs(start_i - start_j) >= 50 + WINDOW
    # one long document: far parts of it serve
    one_book = [(0, s) for s in range(1000, 20000, 1000)]
    perm = unrelated_contexts(one_book, max_distance=500)
    assert all(abs(one_book[i][1] - one_book[j][1]) >= 564 for i, j in enumerate(perm))
    with pytest.raises(ValueError, match="unrelated context"):
        unrelated_contexts([(0, 100), (0, 200), (0, 300)], max_distance=500)


def test_control_separates_what_the_context_says_from_having_context(copy_model):
    """The copying model needs the right tokens PERIOD back: another document's context of the
    same length helps nothing, so the content gain is large once d reaches them; at d = 0 the
    two inputs are identical (gain exactly 0). A model that cannot see before the window has
    content gain 0 at every d."""
    model, docs = copy_model
    result = evaluate_ecl(model, docs, n_targets=48, max_distance=64, unit=8, progress=False,
                          control=True)  # fmt: skip
    control = result.extra["control"]
    assert control["content_gain"][0] == 0.0
    for d, gain, (low, _) in zip(result.distances, control["content_gain"],
                                 control["content_interval"], strict=True):  # fmt: skip
        if d >= 32:
            assert gain > 1.0 and low > 0.5, (d, gain, low)
    no_memory = FoldedTransformer(model.config.replace(segment_len=8)).eval()
    no_memory.load_state_dict(model.state_dict())
    blind = evaluate_ecl(no_memory, docs, n_targets=48, max_distance=64, progress=False,
                         control=True)  # fmt: skip
    assert np.abs(blind.extra["control"]["content_gain"]).max() < 1e-5
