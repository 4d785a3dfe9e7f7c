"""Synthetic tasks, BABILong and --data specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.data.babilong import (
    QUESTION_TEMPLATE,
    BabilongTask,
    TokenizedBackground,
    build_babilong_sample,
    load_babi,
    split_babi,
    split_sentences,
)
from foldformer.data.sources import build_batch_source, parse_data_spec
from foldformer.data.streams import IGNORE_INDEX
from foldformer.data.synthetic import (
    CopyTask,
    Curriculum,
    PasskeyTask,
    RecallTask,
    answer_accuracy,
    evaluate_accuracy,
)
from foldformer.data.text import DataError
from foldformer.data.tokenizers import ByteTokenizer

BABI = Path(__file__).resolve().parent / "fixtures" / "babi"  # the first stories of en-10k
tok = ByteTokenizer()


def _equal(a, b) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "labels", "reset_mask")
    )


@pytest.mark.parametrize("cls", [RecallTask, CopyTask, PasskeyTask])
def test_tasks_are_seeded_resumable_and_split_by_rank(cls):
    kwargs = dict(segment_len=8, n_folds=16, seed=5)
    a, b = cls(4, **kwargs), cls(4, **kwargs)
    assert all(_equal(a.next_batch(), b.next_batch()) for _ in range(3))
    assert not _equal(a.next_batch(), cls(4, segment_len=8, n_folds=16, seed=6).next_batch())
    state = json.loads(json.dumps(a.state_dict()))
    want = [a.next_batch() for _ in range(2)]
    c = cls(4, **kwargs)
    c.load_state_dict(state)
    assert all(_equal(c.next_batch(), w) for w in want)
    ranks = [cls(2, rank=r, world_size=2, **kwargs) for r in range(2)]
    whole = cls(4, **kwargs).next_batch()
    parts = [r.next_batch() for r in ranks]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
    # Independent samples: reset at t=0 only, whole folds, labels only on the answer.
    assert whole.reset_mask[:, 0].all() and whole.reset_mask[:, 1:].sum() == 0
    assert whole.input_ids.shape[1] % 8 == 0
    assert ((whole.labels != IGNORE_INDEX).sum(1) > 0).all()


def test_recall_answer_is_the_key_at_the_requested_distance():
    task = RecallTask(3, segment_len=8, key_len=3, n_folds=4, seed=0)
    for n_folds in (4, 32):
        task.set_folds(n_folds)
        batch = task.next_batch()
        assert batch.input_ids.shape == (3, n_folds * 8)
        for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
            text = tok.decode(ids)
            assert text[0] == "#" and text[-5] == "?" and text[1] == text[-4]  # the name asked
            key = text[2:5]
            assert key.isdigit() and text[-3:] == key
            answer = [t for t in labels if t != IGNORE_INDEX]
            assert tok.decode(answer) == key and labels[-4:-1] == answer  # shifted targets
            assert not any(c.isdigit() for c in text[5:-3])  # the key appears nowhere else
            assert text.index(key, 5) - 2 == task.distance_tokens(n_folds)
    pairs = RecallTask(2, segment_len=8, key_len=2, n_pairs=3, n_folds=8).next_batch()
    text = tok.decode(pairs.input_ids[0])
    assert (
        text.count("#") == 3
        and text[text.index(text[-3]) + 1 : text.index(text[-3]) + 3] == text[-2:]
    )
    with pytest.raises(ValueError, match="raise n_folds"):
        RecallTask(2, segment_len=2, key_len=3, n_folds=1)


def test_copy_and_passkey_layout():
    batch = CopyTask(2, segment_len=8, n_folds=4).next_batch()
    text = tok.decode(batch.input_ids[0])
    payload, copy = text[1:].split("=")
    assert payload == copy and len(payload) == 15
    passkey = PasskeyTask(2, segment_len=16, n_folds=64, seed=1).next_batch()
    text = tok.decode(passkey.input_ids[0]).rstrip("\x00")
    key = text[-6:-1]
    assert key.isdigit() and f"The pass key is {key}. Remember it." in text
    assert text[:-7].endswith("What is the pass key? The pass key is")
    assert tok.decode([t for t in passkey.labels[0].tolist() if t != IGNORE_INDEX]) == f" {key}."
    assert passkey.input_ids.shape[1] <= 64 * 16 + 16


def test_curriculum_climbs_on_accuracy_and_update_counts_rows():
    c = Curriculum.geometric(1, 10, threshold=0.9, window=10)
    assert c.levels == [1, 2, 4, 8, 10]
    assert not c.update(8, 10) and c.level == 1  # 80 % < 90 %: a fresh window, same level
    assert c.update(10, 10) and c.level == 2
    task = RecallTask(4, segment_len=8, n_folds=2, max_folds=8, threshold=0.75, window=4)
    batch = task.next_batch()
    logits = torch.full((*batch.labels.shape, 257), -10.0)
    targets = batch.labels.clamp(min=0)
    logits.scatter_(2, targets[..., None], 10.0)  # a perfect model...
    logits[0, -2, :] = 0.0  # ...except one answer token in row 0
    assert answer_accuracy(logits, batch.labels) == (3, 4)
    metrics = task.update(logits, batch)
    assert metrics["answer_accuracy"] == 0.75 and task.level == 4
    task.set_max_folds(4)
    assert task.curriculum.levels[-1] == 4


def test_recall_with_a_folded_model_and_evaluate_accuracy():
    model = FoldedTransformer(FoldedConfig(d_model=16, n_heads=2, n_layers=1, segment_len=8))
    task = RecallTask(4, segment_len=8, n_folds=4)
    batch = task.next_batch()
    out = model(batch.input_ids, labels=batch.labels, reset_mask=batch.reset_mask)
    assert torch.isfinite(out.loss)
    assert 0.0 <= evaluate_accuracy(model, task, level=4, n_samples=6, batch_size=4) <= 1.0


def test_babi_parsing_and_split():
    samples = load_babi(BABI / "qa2_two-supporting-facts_train.txt")
    first = samples[0]
    assert first.facts[0] == "Mary moved to the bathroom." and len(first.facts) == 6
    assert (first.question, first.answer, first.supporting) == (
        "Where is the football?",
        "garden",
        (2, 5),
    )
    train, validation = split_babi(samples)
    assert len(train) + len(validation) == len(samples) == 80  # question lines of the excerpt
    assert {s.story for s in train}.isdisjoint({s.story for s in validation})
    assert split_babi(samples) == (train, validation)


BACKGROUND = split_sentences(
    " ".join(
        f"Sentence number {i} talks about {'a long winding road ' * (i % 4)}the weather."
        for i in range(300)
    )
)


@pytest.mark.parametrize("n_tokens", [0, 200, 2000])
def test_babilong_keeps_facts_in_order_and_reaches_the_length(n_tokens):
    samples = load_babi(BABI / "qa1_single-supporting-fact_train.txt")
    longest = max(len(tok.encode(" " + s)) for s in BACKGROUND)
    for seed in range(5):
        sample = samples[seed * 7]
        ex = build_babilong_sample(sample, BACKGROUND, n_tokens, tok, np.random.default_rng(seed))
        text = tok.decode(ex.input_ids)
        assert text == ex.text and text.endswith(f"Question: {sample.question} Answer:")
        # Every fact sits where the builder says, in the story's order.
        assert len(ex.fact_positions) == len(sample.facts)
        assert ex.fact_positions == sorted(ex.fact_positions)
        for position, fact in zip(ex.fact_positions, sample.facts, strict=True):
            assert tok.decode(ex.input_ids[position:]).lstrip().startswith(fact)
        bare = build_babilong_sample(sample, BACKGROUND, 0, tok, np.random.default_rng(seed))
        if len(bare.input_ids) > n_tokens:  # the facts alone are longer: no background
            assert ex.n_background == 0 and np.array_equal(ex.input_ids, bare.input_ids)
        else:
            assert n_tokens - longest < len(ex.input_ids) <= n_tokens
        assert ex.answer == sample.answer and tok.decode(ex.answer_ids) == " " + sample.answer


def test_babilong_tokenized_background_builds_the_same_samples():
    samples = load_babi(BABI / "qa1_single-supporting-fact_train.txt")
    tokenized = TokenizedBackground(BACKGROUND, tok)
    for n_tokens in (0, 60, 200, 2000, 10**5):  # 10**5: more than the whole background
        for seed in range(4):
            a, b = (build_babilong_sample(samples[seed], bg, n_tokens, tok,
                                          np.random.default_rng(seed))
                    for bg in (BACKGROUND, tokenized))  # fmt: skip
            assert np.array_equal(a.input_ids, b.input_ids) and a.text == b.text
            assert (a.fact_positions, a.n_background) == (b.fact_positions, b.n_background)
    # One pass at most without exact: the whole background, never a sentence twice.
    assert a.n_background == len(BACKGROUND) and len(a.input_ids) < 10**5


@pytest.mark.parametrize("n_tokens", [1000, 5000, 40000])  # 40000: the books wrap around
def test_babilong_exact_length(n_tokens):
    samples = load_babi(BABI / "qa1_single-supporting-fact_train.txt")
    tokenized = TokenizedBackground(BACKGROUND, tok)
    assert int(tokenized.starts[-1]) < 40000
    for seed in range(5):
        sample = samples[seed * 3]
        ex = build_babilong_sample(sample, tokenized, n_tokens, tok, np.random.default_rng(seed),
                                   exact=True)  # fmt: skip
        assert len(ex.input_ids) == n_tokens and ex.input_ids.dtype == np.int32
        text = tok.decode(ex.input_ids)
        assert text == ex.text and text.endswith(f"Question: {sample.question} Answer:")
        for position, fact in zip(ex.fact_positions, sample.facts, strict=True):
            assert tok.decode(ex.input_ids[position:]).lstrip().startswith(fact)
        # the same draws as without exact: only the cut sentence before the question is added
        loose = build_babilong_sample(sample, tokenized, n_tokens, tok, np.random.default_rng(seed))
        if n_tokens < int(tokenized.starts[-1]):
            assert np.array_equal(ex.input_ids[: ex.fact_positions[-1]],
                                  loose.input_ids[: loose.fact_positions[-1]])  # fmt: skip
    # Too short for the facts and question: exact cannot cut them, the prompt is the bare one.
    short = build_babilong_sample(samples[0], tokenized, 5, tok, np.random.default_rng(0),
                                  exact=True)  # fmt: skip
    assert len(short.input_ids) > 5 and short.n_background == 0


@pytest.mark.parametrize("facts_at", ["start", "end"])
def test_babilong_facts_within_puts_every_fact_near_the_start_or_the_question(facts_at):
    samples = load_babi(BABI / "qa1_single-supporting-fact_train.txt")
    tokenized = TokenizedBackground(BACKGROUND, tok)
    longest = max(len(tok.encode(" " + s)) for s in BACKGROUND)
    within = 400
    for seed in range(6):
        sample = samples[seed * 5]
        ex = build_babilong_sample(sample, tokenized, 40000, tok, np.random.default_rng(seed),
                                   exact=True, facts_within=within, facts_at=facts_at)  # fmt: skip
        assert len(ex.input_ids) == 40000 and tok.decode(ex.input_ids) == ex.text
        for position, fact in zip(ex.fact_positions, sample.facts, strict=True):
            assert tok.decode(ex.input_ids[position:]).lstrip().startswith(fact)
        facts = sum(len(tok.encode(" " + f)) for f in sample.facts)
        question = len(tok.encode(" " + QUESTION_TEMPLATE.format(question=sample.question)))
        if facts_at == "start":  # no fact after the first `within` tokens of background
            assert ex.fact_positions[-1] <= within + facts
        else:  # none before the last `within` (the cut sentence before the question counts)
            assert ex.fact_positions[0] >= 40000 - question - within - facts - longest
    # The default (anywhere) spreads them: over six samples some fact lies in the middle.
    spread = [build_babilong_sample(samples[s * 5], tokenized, 40000, tok,
                                    np.random.default_rng(s), exact=True).fact_positions
              for s in range(6)]  # fmt: skip
    assert any(1000 < p < 39000 for positions in spread for p in positions)
    for bad, message in (({"facts_within": -1}, "facts_within must be >= 0, got -1"),
                         ({"facts_at": "middle"}, "facts_at must be 'start' or 'end'")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            build_babilong_sample(samples[0], tokenized, 1000, tok, np.random.default_rng(0), **bad)


def test_babilong_books_from_an_archive_split(tmp_path):
    import io
    import tarfile

    from foldformer.data.text import PG_VALIDATION_AUTHORS

    archive = tmp_path / "pg.tar.xz"
    books = {"pg/austen-jane/a.txt": "Emma walked to the village. The rain had stopped."}
    for author in PG_VALIDATION_AUTHORS:
        books[f"pg/{author}/b.txt"] = f"A tale by {author}. It ends well."
    with tarfile.open(archive, "w:xz") as tar:
        for name, text in books.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    # The books spec carries its own ?split= inside the task spec's options.
    spec = f"babilong:qa1:{BABI}?books={archive}?split=train&lengths=0,64"
    source = build_batch_source(spec, tok, batch_size=2, seq_len=64, segment_len=16)
    assert source.background.sentences == ["Emma walked to the village.", "The rain had stopped."]
    assert source.curriculum.levels == [0, 64]
    validation = build_batch_source(spec.replace("split=train", "split=validation"), tok,
                                    batch_size=2, seq_len=64, segment_len=16)  # fmt: skip
    assert len(validation.background) == 2 * len(PG_VALIDATION_AUTHORS)
    assert not any("Emma" in s for s in validation.background.sentences)


def test_babilong_task_and_data_specs(tmp_path):
    (tmp_path / "book.txt").write_text(" ".join(BACKGROUND))
    spec = f"babilong:qa1:{BABI}?books={tmp_path / 'book.txt'}&lengths=0,512&window=8"
    parsed = parse_data_spec(spec)
    assert parsed.kind == "babilong" and parsed.options["lengths"] == [0, 512]
    source = build_batch_source(spec, tok, batch_size=2, seq_len=64, segment_len=16, seed=1)
    assert isinstance(source, BabilongTask) and source.level == 0
    batch = source.next_batch()
    assert batch.input_ids.shape[1] % 16 == 0 and batch.reset_mask[:, 0].all()
    answer = tok.decode([t for t in batch.labels[0].tolist() if t != IGNORE_INDEX])
    # the answer and the "." that teaches the model to stop (without it greedy decoding ran on:
    # " officennnn", wrong by its first word)
    assert answer.startswith(" ") and answer.endswith(".")
    assert answer[1:-1] in {"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}
    source.set_folds(512)
    assert batch.input_ids.shape[1] < source.next_batch().input_ids.shape[1] <= 512 + 16
    assert source.eval_batch(512, 3).input_ids.shape[0] == 3
    with pytest.raises(DataError, match="need background books"):
        BabilongTask(2, 16, BABI, lengths=[0, 256])


def test_data_spec_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown option 'colour'.*key_len"):
        parse_data_spec("synthetic:recall?colour=red")
    with pytest.raises(DataError, match="unknown synthetic task 'sort'"):
        parse_data_spec("synthetic:sort")
    monkeypatch.delenv("FOLDFORMER_BABI", raising=False)
    with pytest.raises(DataError, match="names no bAbI files"):
        parse_data_spec("babilong:qa1")
    (tmp_path / "a.txt").write_text("some text")
    assert parse_data_spec(str(tmp_path / "a.txt")).kind == "text"
    with pytest.raises(DataError, match="cannot be combined"):
        build_batch_source([str(tmp_path), "synthetic:copy"], tok, 2, 16, 8)
    source = build_batch_source("synthetic:recall?key_len=2&n_folds=2&max_folds=8", tok, 2, 16, 8)
    assert isinstance(source, RecallTask) and source.curriculum.levels == [2, 4, 8]


def test_uniform_mix_draws_every_fold_count_not_only_curriculum_levels():
    """`uniform=true`: a mixed-in batch has any fold count from the first level up to the
    current one (the passkey read-out trained at 1, 2, 4, … folds answered only at those
    counts); without it only lower curriculum levels. The current level is unchanged."""
    spec = "synthetic:passkey?n_folds=1&max_folds=64&mix=0.5"
    levels = {}
    for uniform in (False, True):
        source = build_batch_source(spec + f"&uniform={str(uniform).lower()}", tok,
                                    batch_size=1, seq_len=128, segment_len=128)  # fmt: skip
        assert source.uniform is uniform
        source.set_folds(32)
        drawn = [source._batch_level() for source.batches in range(400)]
        assert drawn.count(32) > 120  # about half the batches stay at the current level
        levels[uniform] = set(drawn)
    assert levels[False] <= {1, 2, 4, 8, 16, 32}
    assert levels[True] == set(range(1, 33))  # every count, the current one included
    with pytest.raises(ValueError, match="uniform must be true or false, got 'yes'"):
        build_batch_source(spec + "&uniform=yes", tok, 1, 128, segment_len=128)
    # a drawn count that is no level still makes a prompt that many folds long (within one
    # filler sentence): the passkey builder takes any length
    source = build_batch_source(spec + "&uniform=true", tok, 1, 128, segment_len=128)
    assert abs(len(source.make_row(np.random.default_rng(0), 23).ids) - 23 * 128) < 32


def test_key_recall_mix_is_the_uniform_mix_it_always_had():
    """KeyRecallTask's own rule (half the batches at a uniform shorter distance) is now the
    shared `uniform` mix: the same levels, batch by batch, as the rule it replaced."""
    from foldformer.demo import KeyRecallTask

    task = KeyRecallTask(4, 8, max_folds=64, seed=3)
    task.set_folds(16)
    for batch in range(300):
        task.batches = batch
        rng = np.random.default_rng([3, batch, 2**32 - 1])  # the replaced rule, verbatim
        old = int(rng.integers(1, 16)) if rng.random() < 0.5 else 16
        assert task._batch_level() == old
    levels_only = KeyRecallTask(4, 8, max_folds=64, seed=3, uniform=False)
    levels_only.set_folds(16)
    assert {levels_only._batch_level() for levels_only.batches in range(300)} == {1, 2, 4, 8, 16}
    # A checkpoint written before `uniform` existed saved mix=0 (the old rule ignored it): it
    # resumes at its level, mixing as before; a checkpoint of the other setting is refused.
    old = task.state_dict()
    del old["uniform"]
    old["curriculum"]["mix"] = 0.0
    resumed = KeyRecallTask(4, 8, max_folds=64, seed=3)
    resumed.load_state_dict(old)
    assert resumed.level == 16 and resumed.curriculum.mix == 0.5
    assert len({resumed._batch_level() for resumed.batches in range(100)}) > 5
    with pytest.raises(ValueError, match="saved uniform=True but this run has uniform=False"):
        KeyRecallTask(4, 8, max_folds=64, seed=3, uniform=False).load_state_dict(task.state_dict())


def test_passkey_shuffle_reorders_the_filler_and_only_when_asked():
    """shuffle=true (training only): each whole group of five filler sentences in a random
    order, same length, same key and question; without it the rows are the §6 prompts as
    before (the same draws)."""
    import random

    from foldformer.data.passkey import FILLER_SENTENCES, build_passkey_prompt

    fixed = build_passkey_prompt(tok, 2048, 0.5, key="12345")
    mixed = build_passkey_prompt(tok, 2048, 0.5, key="12345", shuffle=random.Random(0))
    assert len(mixed.ids) == len(fixed.ids) and mixed.context_len == fixed.context_len
    assert mixed.ids[mixed.context_len :] == fixed.ids[fixed.context_len :]  # the question
    text = tok.decode(mixed.ids[: mixed.context_len])
    assert text != tok.decode(fixed.ids[: fixed.context_len]) and "12345" in text
    assert sorted(text.count(s) for s in FILLER_SENTENCES) == sorted(
        tok.decode(fixed.ids).count(s) for s in FILLER_SENTENCES
    )
    spec = "synthetic:passkey?n_folds=2&max_folds=4"
    plain = build_batch_source(spec, tok, 2, 128, segment_len=128)
    rng = np.random.default_rng(5)
    row = plain.make_row(rng, 2)
    rng = np.random.default_rng(5)
    key, depth = str(int(rng.integers(10_000, 100_000))), float(rng.random())
    assert row.ids[:-7] == build_passkey_prompt(tok, 256, depth, key=key).ids  # + " NNNNN."
    shuffled = build_batch_source(spec + "&shuffle=true", tok, 2, 128, segment_len=128)
    assert shuffled.make_row(np.random.default_rng(5), 2).ids != row.ids
    with pytest.raises(ValueError, match="shuffle must be true or false, got 'yes'"):
        build_batch_source(spec + "&shuffle=yes", tok, 2, 128, segment_len=128)


def test_passkey_straddle_keeps_the_most_filler_whose_answer_crosses_a_fold():
    """straddle=w (training only): the longest prompt within the budget whose answer crosses a
    boundary of w-token folds (the §6 1M and 16M prompts all do at w = 128); the same key,
    depth and question; a budget with no such prompt is refused. PasskeyTask's straddle=P
    shortens that fraction of rows and leaves the others (and the default rows) unchanged."""
    import random

    from foldformer.data.passkey import answer_straddles, build_passkey_prompt

    def build(n_tokens, depth, order, **kw):
        shuffle = None if order is None else random.Random(order)
        return build_passkey_prompt(tok, n_tokens, depth, key="12345", shuffle=shuffle, **kw)

    for n_tokens, depth, order in [(2048, 0.0, None), (3000, 0.5, None), (5000, 1.0, 1)]:
        plain = build(n_tokens, depth, order)
        cut = build(n_tokens, depth, order, straddle=128)
        assert answer_straddles(len(cut.ids), len(cut.answer_ids), 128)
        assert not answer_straddles(len(plain.ids), len(plain.answer_ids), 128)
        assert len(cut.ids) < len(plain.ids) <= n_tokens
        assert cut.ids[cut.context_len :] == plain.ids[plain.context_len :]  # the question
        assert tok.decode(cut.ids[cut.key_start : cut.key_end]) == tok.decode(
            plain.ids[plain.key_start : plain.key_end]
        )
        assert abs(cut.actual_depth - depth) < 0.02
        # the largest: every longer prompt up to the budget answers within one fold (a filler
        # sentence is at least 11 tokens, so steps of 4 meet every prompt length)
        for budget in range(len(cut.ids) + 1, n_tokens + 1, 4) if order is None else ():
            longer = build_passkey_prompt(tok, budget, depth, key="12345")
            if len(longer.ids) > len(cut.ids):
                assert not answer_straddles(len(longer.ids), len(longer.answer_ids), 128)
    straddling = build_passkey_prompt(tok, 4096, 0.5, key="12345")  # 4,093 tokens: it does
    assert build_passkey_prompt(tok, 4096, 0.5, key="12345", straddle=128).ids == straddling.ids
    assert answer_straddles(1048574, 6, 128) and not answer_straddles(1048570, 6, 128)
    # 5 tokens short of the boundary: the last digit is fed in the next fold, where the model
    # must stop the answer (96 folds at w = 128); 6 short: all of it inside the fold
    assert answer_straddles(96 * 128 - 5, 6, 128) and not answer_straddles(96 * 128 - 6, 6, 128)
    with pytest.raises(ValueError, match="straddling a fold of 128"):
        build_passkey_prompt(tok, 128, 0.5, key="12345", straddle=128)

    spec = "synthetic:passkey?n_folds=8&max_folds=8"
    plain = build_batch_source(spec, tok, 2, 128, segment_len=128)
    same = build_batch_source(spec + "&straddle=0", tok, 2, 128, segment_len=128)
    every = build_batch_source(spec + "&straddle=1", tok, 2, 128, segment_len=128)
    half = build_batch_source(spec + "&straddle=0.5&shuffle=true", tok, 2, 128, segment_len=128)
    crossed = 0
    for seed in range(40):
        row = plain.make_row(np.random.default_rng(seed), 8)
        assert same.make_row(np.random.default_rng(seed), 8).ids == row.ids
        prompt_len = len(row.ids) - 7  # + " NNNNN."
        assert not answer_straddles(prompt_len, 6, 128)
        assert answer_straddles(len(every.make_row(np.random.default_rng(seed), 8).ids) - 7, 6, 128)
        crossed += answer_straddles(
            len(half.make_row(np.random.default_rng(seed), 8).ids) - 7, 6, 128
        )
    assert 8 <= crossed <= 32  # about half
    # level 1 has no straddling prompt: the plain one
    assert (
        every.make_row(np.random.default_rng(0), 1).ids
        == plain.make_row(np.random.default_rng(0), 1).ids
    )
    for bad, shown in [("2", "2"), ("yes", "'yes'"), ("true", "True")]:
        with pytest.raises(
            ValueError, match=f"straddle is a fraction of rows in \\[0, 1\\], got {shown}"
        ):
            build_batch_source(spec + f"&straddle={bad}", tok, 2, 128, segment_len=128)


def test_babilong_straddle_builds_whole_folds_and_leaves_other_rows_alone(tmp_path):
    from foldformer.data.passkey import answer_straddles

    (tmp_path / "book.txt").write_text(" ".join(BACKGROUND * 20))
    spec = f"babilong:qa1:{BABI}?books={tmp_path / 'book.txt'}&lengths=0,512"
    plain = build_batch_source(spec, tok, batch_size=2, seq_len=64, segment_len=16)
    every = build_batch_source(spec + "&straddle=1", tok, batch_size=2, seq_len=64, segment_len=16)
    half = build_batch_source(spec + "&straddle=0.5", tok, batch_size=2, seq_len=64, segment_len=16)

    def prompt_and_answer(task, seed, level=512):
        row = task.make_row(np.random.default_rng(seed), level)
        start = next(i for i, t in enumerate(row.labels) if t != IGNORE_INDEX) + 1
        return len(row.ids[:start]), len(row.ids) - start, row.ids

    for seed in range(10):  # as babilong_gpu.py builds them: every answer starts a new fold
        prompt, answer, _ = prompt_and_answer(every, seed)
        assert prompt == 512 and answer_straddles(prompt, answer, 16)
        # a level between whole folds (uniform mixing draws any): the whole folds within it
        assert prompt_and_answer(every, seed, level=500)[0] == 496
    # the default rows are the rows built without the option
    for seed in range(10):
        rng = np.random.default_rng(seed)
        sample = plain.train_samples[int(rng.integers(0, len(plain.train_samples)))]
        example = build_babilong_sample(sample, plain.background, 512, tok, rng)
        assert prompt_and_answer(plain, seed)[2] == example.input_ids.tolist() + list(
            example.answer_ids
        ) + list(tok.encode("."))
    # without the option a prompt falls short of the level by part of a sentence
    assert sum(prompt_and_answer(plain, s)[0] == 512 for s in range(40)) <= 4
    exact = sum(prompt_and_answer(half, s)[0] == 512 for s in range(40))
    assert 10 <= exact <= 30, exact
    # at level 0 (the story alone) there is no fold to fill: the story and question only
    rng = np.random.default_rng(0)
    sample = every.train_samples[int(rng.integers(0, len(every.train_samples)))]
    story = build_babilong_sample(sample, every.background, 0, tok, rng).input_ids
    assert prompt_and_answer(every, 0, level=0)[0] == len(story)
    for bad in ("2", "-0.5", "true", "half"):
        with pytest.raises(DataError, match=r"^data spec babilong:qa1: straddle is a fraction"):
            build_batch_source(f"{spec}&straddle={bad}", tok, 2, 64, 16)
    with pytest.raises(DataError, match=r"^data spec babilong:qa1: curriculum mix"):
        build_batch_source(f"{spec}&mix=2", tok, 2, 64, 16)


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa4", "qa5"])
def test_babilong_permute_renames_entities_and_keeps_every_answer_true(task, tmp_path):
    """permute=true renames a training sample's people, places and objects by one permutation
    per class (so a model cannot answer from a remembered story): each entity word stays in
    its class, one word always becomes the same word in the facts, question and answer, the
    answer is still in a supporting fact and the other words are unchanged; the task's rows
    are the renamed stories, held-out rows are not renamed."""
    import re

    from foldformer.data.babilong import babi_file, entity_classes, load_babi, permute_entities

    samples = load_babi(babi_file(task, BABI))
    classes = entity_classes(samples)
    assert ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office") in classes
    class_of = {w: k for k, names in enumerate(classes) for w in names}
    renamed = 0
    for seed, sample in enumerate(samples):
        new = permute_entities(sample, classes, np.random.default_rng(seed))
        assert any(re.search(rf"\b{new.answer}\b", new.facts[i]) for i in new.supporting)
        renamed += new != sample
        old_words = [w for t in (*sample.facts, sample.question, sample.answer) for w in t.split()]
        new_words = [w for t in (*new.facts, new.question, new.answer) for w in t.split()]
        mapping = {}
        for a, b in zip(old_words, new_words, strict=True):
            a, b = a.strip(".?"), b.strip(".?")
            if a in class_of:
                assert class_of.get(b) == class_of[a], (a, b)
                assert mapping.setdefault(a, b) == b  # the same word everywhere
            else:
                assert a == b
        assert len(set(mapping.values())) == len(mapping)  # different words stay different
    assert renamed >= 0.9 * len(samples)
    (tmp_path / "book.txt").write_text(" ".join(BACKGROUND * 20))
    spec = f"babilong:{task}:{BABI}?books={tmp_path / 'book.txt'}&lengths=0,512"
    permuted = build_batch_source(
        spec + "&permute=true", tok, batch_size=2, seq_len=64, segment_len=16
    )
    plain = build_batch_source(spec, tok, batch_size=2, seq_len=64, segment_len=16)
    for seed in range(10):  # a row: the sample drawn, renamed, then built, from one generator
        rng = np.random.default_rng(seed)
        sample = permuted.train_samples[int(rng.integers(0, len(permuted.train_samples)))]
        story = permute_entities(sample, permuted.entity_classes, rng)
        example = build_babilong_sample(story, permuted.background, 512, tok, rng)
        row = permuted.make_row(np.random.default_rng(seed), 512).ids
        assert row[: len(example.input_ids)] == example.input_ids.tolist()
    for seed in range(5):  # held-out rows are the stories as written
        a = permuted.make_row(np.random.default_rng(seed), 0, validation=True).ids
        assert a == plain.make_row(np.random.default_rng(seed), 0, validation=True).ids
    for bad in ("no", "1", "yes"):
        with pytest.raises(
            DataError, match=r"^data spec babilong:\w+: permute must be true or false"
        ):
            build_batch_source(f"{spec}&permute={bad}", tok, 2, 64, 16)


def test_babilong_permute_needs_entities_to_rename():
    """A bAbI file with no two people, places or objects: permute is refused when the task is
    built, not with a KeyError in the middle of training."""
    from foldformer.data.babilong import BabilongTask, BabiSample

    odd = [BabiSample(("The cat is grey.",), "What colour is the cat?", "grey", (0,), 0),
           BabiSample(("The dog is white.",), "What colour is the dog?", "white", (0,), 1)]  # fmt: skip
    with pytest.raises(ValueError, match="permute: no two people, places or objects"):
        BabilongTask(2, 16, odd, lengths=[0], permute=True, tokenizer=tok)
    assert (
        BabilongTask(2, 16, odd, lengths=[0], tokenizer=tok)
        .make_row(np.random.default_rng(0), 0)
        .ids
    )
