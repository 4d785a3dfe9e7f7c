"""Streaming helpers give exactly what one call over the whole sequence gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.generate import greedy_generate, ingest, score, stream_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(**overrides) -> FoldedTransformer:
    values = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, segment_len=4, memory_len=3)
    values.update(overrides)
    torch.manual_seed(0)
    return FoldedTransformer(FoldedConfig(**values)).double().eval()


MODELS = [
    dict(segment_len=4, memory_len=3),
    dict(segment_len=5, memory_len=0),
    dict(segment_len=10**9, memory_len=0),  # full attention: the state is a growing cache
]


@pytest.mark.parametrize("shape", MODELS, ids=["folded", "no-memory", "full-attention"])
@pytest.mark.parametrize("chunk_size", [3, 4, 7, None])
def test_ingest_then_score_equals_one_call(shape, chunk_size):
    model = make_model(**shape)
    ids = torch.randint(0, 40, (2, 31))
    logits = model(ids).logits
    expected = F.cross_entropy(logits.transpose(1, 2)[:, :, :-1], ids[:, 1:], reduction="none")
    for split in (1, 9, 20):  # context of `split` tokens, then the rest as targets
        losses = score(model, ids[:, :split], ids[:, split:], chunk_size=chunk_size)
        torch.testing.assert_close(losses, expected[:, split - 1 :].float(), rtol=1e-5, atol=1e-6)
    # the whole stream in chunks, and the state it ends in
    losses, state = stream_losses(model, ids, chunk_size=chunk_size)
    torch.testing.assert_close(losses, expected.float(), rtol=1e-5, atol=1e-6)
    state2 = ingest(model, ids, chunk_size=chunk_size)
    torch.testing.assert_close(state2.memory, state.memory)
    # continuing an ingested stream gives the one-call logits of the next token
    nxt = model(ids[:, -1:], ingest(model, ids[:, :-1], chunk_size=chunk_size)).logits[:, -1]
    torch.testing.assert_close(nxt, logits[:, -1], rtol=0, atol=1e-10)


def test_greedy_generate_matches_argmax_of_full_recomputation():
    model = make_model()
    context = torch.randint(0, 40, (3, 13))
    prompt = torch.randint(0, 40, (3, 2))
    state = ingest(model, context, chunk_size=5)
    out = greedy_generate(model, prompt, max_new_tokens=6, memory=state)
    assert out.shape == (3, 6)
    seq = torch.cat([context, prompt], dim=1)
    for t in range(6):  # recompute from scratch: each token is the argmax after the sequence
        expected = model(seq).logits[:, -1].argmax(-1)
        assert torch.equal(out[:, t], expected)
        seq = torch.cat([seq, expected[:, None]], dim=1)


def test_greedy_generate_stops_when_every_row_hit_a_stop_id():
    model = make_model()
    prompt = torch.randint(0, 40, (2, 5))
    free = greedy_generate(model, prompt, max_new_tokens=8)
    stop = int(free[0, 2])
    out = greedy_generate(model, prompt, max_new_tokens=8, stop_ids=[stop])
    # row 0 stops at the first occurrence of `stop`; afterwards a stopped row repeats it
    first = int((free[0] == stop).nonzero()[0])
    hits = [(free[r] == stop).nonzero() for r in range(2)]
    assert out.shape[1] <= 8
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert bool((out[0, first:] == stop).all())
    if all(len(h) for h in hits):  # both rows stopped: decoding ended at the later one
        assert out.shape[1] == max(int(h[0]) for h in hits) + 1


def test_score_rejects_empty_context():
    model = make_model()
    with pytest.raises(ValueError, match="context"):
        score(model, torch.zeros(1, 0, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
