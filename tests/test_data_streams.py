"""Token caches and training streams: reuse, invalidation, continuity, resets, resume, ranks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.data.cache import tokenize_corpus
from foldformer.data.streams import IGNORE_INDEX, TextStreams
from foldformer.data.tokenizers import ByteTokenizer, train_bpe

TEXTS = {
    "a.txt": "Alpha document, fairly long so that it spans several folds of the stream.",
    "b.txt": "Bee.",
    "c.md": "Gamma: a third one; medium length text here.",
    "d.txt": "Delta delta delta delta delta delta delta delta delta delta delta delta!",
    "e.txt": "E",
}


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text)
    return root


def test_cache_layout_reuse_and_invalidation(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    tok = ByteTokenizer()
    corpus = tokenize_corpus([str(corpus_dir)], tok, cache, progress=False)
    assert not corpus.reused and len(corpus) == len(TEXTS)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16
    for i, name in enumerate(sorted(TEXTS)):
        assert corpus.names[i].endswith(name)
        assert tok.decode(corpus.document(i)) == TEXTS[name]
        assert corpus.tokens[corpus.doc_ends[i] - 1] == tok.eod_id
    assert corpus.num_tokens == sum(len(t.encode()) + 1 for t in TEXTS.values())

    again = tokenize_corpus([str(corpus_dir)], tok, cache, progress=False)
    assert again.reused and again.path == corpus.path
    np.testing.assert_array_equal(again.tokens, corpus.tokens)

    # Editing a file (new size and mtime) gives a new cache with the new text.
    (corpus_dir / "b.txt").write_text("Bee, edited.")
    os.utime(corpus_dir / "b.txt", ns=(1, 10**18))
    edited = tokenize_corpus([str(corpus_dir)], tok, cache, progress=False)
    assert not edited.reused and edited.path != corpus.path
    assert tok.decode(edited.document(1)) == "Bee, edited."
    # So does another tokenizer; no temporary folders are left behind.
    bpe = train_bpe([str(corpus_dir)], vocab_size=270, progress=False)
    other = tokenize_corpus([str(corpus_dir)], bpe, cache, progress=False)
    assert not other.reused and other.eod_id == bpe.eod_id
    assert bpe.decode(other.document(0)) == TEXTS["a.txt"]
    assert sorted(p.name.startswith(".") for p in cache.iterdir()) == [False] * 3


def _corpus(corpus_dir, tmp_path):
    return tokenize_corpus([str(corpus_dir)], ByteTokenizer(), tmp_path / "cache", progress=False)


def _row_streams(batches):
    """Concatenate per-row input ids / labels / resets across batches."""
    ids = torch.cat([b.input_ids for b in batches], dim=1)
    labels = torch.cat([b.labels for b in batches], dim=1)
    reset = torch.cat([b.reset_mask for b in batches], dim=1)
    return ids, labels, reset


def test_streams_are_continuous_documents_with_fold_aligned_resets(corpus_dir, tmp_path):
    corpus = _corpus(corpus_dir, tmp_path)
    w = 4
    streams = TextStreams(corpus, batch_size=3, seq_len=8, segment_len=w, seed=1)
    batches = [streams.next_batch() for _ in range(40)]
    ids, labels, reset = _row_streams(batches)
    eod = corpus.eod_id
    texts = {t.encode() for t in TEXTS.values()}
    assert reset[:, 0].all()
    for row in range(3):
        starts = torch.nonzero(reset[row]).flatten().tolist()
        assert all(s % w == 0 for s in starts)  # resets only on fold boundaries
        for k, (a, b) in enumerate(zip(starts, starts[1:], strict=False)):
            seg_ids, seg_labels = ids[row, a:b].tolist(), labels[row, a:b].tolist()
            n = seg_ids.index(eod) + 1  # the document, eod included
            doc = bytes(seg_ids[: n - 1])
            # The first unit of a row may begin inside its document; all others are whole.
            assert doc in texts if k > 0 else any(t.endswith(doc) for t in texts)
            assert seg_ids[n:] == [eod] * (b - a - n) and b - a - n < w  # padding only to the fold
            assert seg_labels[: n - 1] == seg_ids[1:n]  # labels are the next token
            assert seg_labels[n - 1 :] == [IGNORE_INDEX] * (b - a - n + 1)
    # Rows start at different places of the corpus.
    assert len({tuple(ids[r, :8].tolist()) for r in range(3)}) == 3


def test_streams_feed_a_folded_model_with_memory_across_batches(corpus_dir, tmp_path):
    corpus = _corpus(corpus_dir, tmp_path)
    config = FoldedConfig(d_model=16, n_heads=2, n_layers=1, segment_len=4, memory_len=4)
    model = FoldedTransformer(config).eval()
    streams = TextStreams(corpus, batch_size=4, seq_len=12, segment_len=4, seed=3)
    memory = None
    with torch.no_grad():
        for _ in range(12):  # the model raises if a reset falls inside a fold
            batch = streams.next_batch()
            out = model(batch.input_ids, memory, labels=batch.labels, reset_mask=batch.reset_mask)
            memory = out.memory
            assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="seq_len=10 must be a multiple of segment_len=4"):
        TextStreams(corpus, batch_size=2, seq_len=10, segment_len=4)


def test_state_dict_resume_gives_identical_batches(corpus_dir, tmp_path):
    corpus = _corpus(corpus_dir, tmp_path)
    a = TextStreams(corpus, batch_size=2, seq_len=8, segment_len=4, seed=7)
    for _ in range(9):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    expected = [a.next_batch() for _ in range(30)]  # crosses epochs
    b = TextStreams(corpus, batch_size=2, seq_len=8, segment_len=4, seed=7)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.reset_mask, want.reset_mask)
    c = TextStreams(corpus, batch_size=2, seq_len=8, segment_len=4, seed=8)
    with pytest.raises(ValueError, match="seed"):
        c.load_state_dict(state)


def test_ranks_split_the_global_batch_exactly(corpus_dir, tmp_path):
    corpus = _corpus(corpus_dir, tmp_path)
    single = TextStreams(corpus, batch_size=6, seq_len=8, segment_len=4, seed=2)
    ranks = [
        TextStreams(corpus, batch_size=3, seq_len=8, segment_len=4, seed=2, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(10):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for field in ("input_ids", "labels", "reset_mask"):
            joined = torch.cat([getattr(p, field) for p in parts])
            assert torch.equal(joined, getattr(whole, field))
    with pytest.raises(ValueError, match="rank"):
        TextStreams(corpus, batch_size=3, seq_len=8, segment_len=4, rank=2, world_size=2)
