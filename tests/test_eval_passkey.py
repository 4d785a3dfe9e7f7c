"""Passkey prompts (DESIGN.md §6 format, length, depth) and the passkey evaluation."""

from __future__ import annotations

import pytest
import torch

from foldformer import FoldedConfig, FoldedTransformer
from foldformer.data.passkey import FILLER_SENTENCES, QUESTION, build_passkey_prompt, key_sentence
from foldformer.data.tokenizers import ByteTokenizer
from foldformer.evaluate.passkey import evaluate_passkey, is_correct, passkey_records
from foldformer.evaluate.records import validate_record

TOKENIZER = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


LONGEST_SENTENCE = max(len(" " + s) for s in FILLER_SENTENCES)


@pytest.mark.parametrize("n_tokens", [200, 1000, 4096, 65536])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_has_the_requested_length_and_key_depth(n_tokens, depth):
    prompt = build_passkey_prompt(TOKENIZER, n_tokens, depth, seed=7)
    text = TOKENIZER.decode(prompt.ids)
    # length: at most n, short by less than one filler sentence (plus the key's optional space)
    assert n_tokens - LONGEST_SENTENCE - 1 < len(prompt.ids) <= n_tokens
    # format: filler sentences, the key sentence once, the question last
    assert text.endswith(" " + QUESTION)
    assert text.count(key_sentence(prompt.key)) == 1
    assert len(prompt.key) == 5 and prompt.key.isdigit()
    assert TOKENIZER.decode(prompt.ids[prompt.key_start : prompt.key_end]).strip() == (
        key_sentence(prompt.key)
    )
    assert TOKENIZER.decode(prompt.question_ids) == " " + QUESTION
    assert TOKENIZER.decode(prompt.answer_ids) == prompt.answer == " " + prompt.key
    # depth: the key starts at fraction p of the filler, within one filler sentence
    filler = prompt.context_len - (prompt.key_end - prompt.key_start)
    assert abs(prompt.key_start - depth * filler) <= LONGEST_SENTENCE
    assert prompt.actual_depth == pytest.approx(depth, abs=LONGEST_SENTENCE / filler)
    rest = text.replace(key_sentence(prompt.key), "").replace(QUESTION, "")
    for sentence in FILLER_SENTENCES:
        rest = rest.replace(sentence, "")
    assert rest.strip() == ""  # nothing but filler around the key


def test_prompt_is_seeded_and_rejects_bad_arguments():
    a = build_passkey_prompt(TOKENIZER, 500, 0.5, seed=1)
    assert a.ids == build_passkey_prompt(TOKENIZER, 500, 0.5, seed=1).ids
    assert a.key != build_passkey_prompt(TOKENIZER, 500, 0.5, seed=2).key
    assert build_passkey_prompt(TOKENIZER, 500, 0.5, key=12345).key == "12345"
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(TOKENIZER, 500, 1.5)
    with pytest.raises(ValueError, match="too short"):
        build_passkey_prompt(TOKENIZER, 50, 0.5)


def test_exact_match_of_the_digits():
    assert is_correct(" 12345.", "12345")
    assert is_correct("12345 is", "12345")
    assert not is_correct(" 123456", "12345")
    assert not is_correct(" 1234", "12345")
    assert not is_correct(" the 12345", "12345")


def test_evaluation_grid_and_records():
    torch.manual_seed(0)
    model = FoldedTransformer(
        FoldedConfig(
            vocab_size=257, d_model=32, n_layers=1, n_heads=2, segment_len=16, memory_len=8
        )
    ).eval()
    cells = evaluate_passkey(model, TOKENIZER, [128, 300], [0.0, 1.0], samples=3, progress=False)
    assert [(c.length, c.depth) for c in cells] == [(128, 0.0), (128, 1.0), (300, 0.0), (300, 1.0)]
    for cell in cells:
        assert cell.samples == 3 and 0 <= cell.correct <= 3
        assert all(len(key) == 5 for key, _ in cell.outputs)
    records = passkey_records(cells, {"eval": {"samples": 3}}, "cpu")
    assert len(records) == 5
    for record in records:
        validate_record(record)
        low, high = record["interval"]
        assert 0 <= low <= record["value"] <= high <= 1
    assert records[-1]["metric"] == "passkey_accuracy_overall"
    # A prompt of 4,093 tokens ends 3 tokens before a fold boundary at w = 16: the 6-token
    # answer is written partly in the next fold, and the cell says so (the §6 1M prompts too).
    assert [c.straddling for c in cells] == [0, 0, 0, 0]
    (far,) = evaluate_passkey(model, TOKENIZER, [4096], [0.0], samples=2, progress=False)
    assert far.straddling == 2
    (record, _) = passkey_records([far], {}, "cpu")
    assert record["extra"]["answers_straddling_a_segment"] == 2


def test_batching_all_depths_together_changes_no_answer():
    """Streaming every prompt of a length in one batch (the fast path for long lengths) gives
    each prompt exactly the text it gets streamed alone, for a gated model with a partial
    last fold."""
    torch.manual_seed(0)
    config = FoldedConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, segment_len=16,
                          memory_len=16, memory_gate=True, gate_activation="clamp_st")  # fmt: skip
    model = FoldedTransformer(config).eval()
    args = (model, TOKENIZER, [300], [0.0, 0.5, 1.0])
    together = evaluate_passkey(*args, samples=4, batch_size=12, progress=False)
    alone = evaluate_passkey(*args, samples=4, batch_size=1, progress=False)
    assert [c.outputs for c in together] == [c.outputs for c in alone]


def _tiny_gated_model() -> FoldedTransformer:
    torch.manual_seed(0)
    config = FoldedConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, segment_len=16,
                          memory_len=16, memory_gate=True, gate_activation="clamp_st")  # fmt: skip
    return FoldedTransformer(config).eval()


def test_compiled_fold_changes_no_answer():
    """`eval passkey --compile` (the fold step through torch.compile; aot_eager here, so the
    CPU test needs no C++ build) streams the same answers as the eager model."""
    model = _tiny_gated_model()
    args = (TOKENIZER, [300], [0.0, 1.0])
    plain = evaluate_passkey(model, *args, samples=3, batch_size=6, progress=False)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    assert model.compile_fold(backend=counter)
    compiled = evaluate_passkey(model, *args, samples=3, batch_size=6, progress=False)
    assert counter.frame_count >= 1  # the folds ran through the compiled step
    assert [c.outputs for c in compiled] == [c.outputs for c in plain]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_ingest_changes_no_answer():
    """`--cuda-graph` replays captured chunks of folds: the same answers as eager streaming
    (run on the H200: benchmarks/results/h200/retrieval/round4/graph_check.json)."""
    model = _tiny_gated_model().cuda()
    args = (TOKENIZER, [2100], [0.0, 0.5, 1.0])
    plain = evaluate_passkey(model, *args, samples=4, batch_size=12, progress=False)
    graphed = evaluate_passkey(model, *args, samples=4, batch_size=12, progress=False,
                               cuda_graph=True)  # fmt: skip
    assert [c.outputs for c in graphed] == [c.outputs for c in plain]
