"""Sampling, batched generation, context states and the text engine, for every model type."""

from __future__ import annotations

import pytest
import torch

from foldformer.data.tokenizers import ByteTokenizer
from foldformer.generate import (
    ContextState,
    ContextStateError,
    Engine,
    SamplingConfig,
    TextDecoder,
    chunk_starts,
    read_context,
    sample_next,
)
from foldformer.models import build_model
from foldformer.variants.baselines import FULL_ATTENTION_SEGMENT

SHAPE = dict(vocab_size=257, d_model=16, n_layers=2, n_heads=2, segment_len=4, memory_len=3)
MODELS = {
    "folded": ("folded", {}),
    "full_attention": ("folded", dict(segment_len=FULL_ATTENTION_SEGMENT, memory_len=0)),
    "transformer_xl": ("transformer_xl", {}),
    "rmt": ("rmt", {}),
    "no_memory": ("folded", dict(memory_len=0)),
    "folded_gate": ("folded", dict(memory_gate=True)),
    "sliding_window": ("sliding_window", dict(memory_len=0)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_engine(name: str = "folded", seed: int = 0, **overrides) -> Engine:
    model_type, values = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(model_type, {**SHAPE, **values, **overrides}).double().eval()
    return Engine(model, ByteTokenizer())


# -- sampling ---------------------------------------------------------------------------------


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=0.0)), greedy)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=5.0, top_k=1)), greedy)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=5.0, top_p=1e-6)), greedy)
    top5 = logits.topk(5, dim=-1).indices
    for seed in range(20):  # top-k never leaves the k most likely tokens
        gens = [torch.Generator().manual_seed(seed) for _ in range(3)]
        token = sample_next(logits, SamplingConfig(temperature=3.0, top_k=5), gens)
        assert bool((top5 == token[:, None]).any(-1).all())
    # top-p keeps the smallest set reaching p: with one token at 0.9, p=0.85 keeps only it
    peaked = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed)]
        assert int(sample_next(peaked, SamplingConfig(top_p=0.85), gens)) == 0
    # repetition penalty: positive logits divided, negative multiplied, others untouched
    row = torch.tensor([[2.0, -1.0, 1.9]])
    assert int(sample_next(row, SamplingConfig(temperature=0.0))) == 0
    penalised = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert int(sample_next(row, penalised, history=[[0]])) == 2
    assert int(sample_next(torch.tensor([[-1.0, -1.5]]), penalised, history=[[0]])) == 1


def test_seed_gives_the_same_draws_and_bad_values_are_refused():
    logits = torch.randn(2, 100)
    config = SamplingConfig()
    draws = [
        sample_next(logits, config, [torch.Generator().manual_seed(7) for _ in range(2)])
        for _ in "ab"
    ]
    assert torch.equal(draws[0], draws[1])
    for bad in (
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_new_tokens=-1),
        dict(repetition_penalty=0.0),
        dict(seed=-3),
        dict(stop=("",)),
    ):
        (name,) = bad
        with pytest.raises(ValueError, match=name):
            SamplingConfig(**bad)


def test_text_decoder_holds_back_cut_characters_and_stop_prefixes():
    tok = ByteTokenizer()
    dec = TextDecoder(tok, stop=("END",))
    pieces = [dec.push(t) for t in tok.encode("é ok EN")]  # é is two bytes
    assert pieces[0] == ""  # half a character waits
    assert "".join(pieces) == "é ok "  # "EN" may become "END"
    assert dec.push(tok.encode("D")[0]) == "" and dec.stopped
    assert dec.text == "é ok "
    dec = TextDecoder(tok, stop=("END",))
    assert "".join(dec.push(t) for t in tok.encode("xEN")) + dec.finish() == "xEN"


# -- generation through the common protocol ---------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_completion_is_the_argmax_of_full_recomputation(name):
    engine = make_engine(name)
    context = engine.read("a context longer than one fold, read in chunks")
    config = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eod=False)
    (done,) = engine.complete([" Q?"], [context], config)
    seq = torch.tensor([list(b"a context longer than one fold, read in chunks Q?")])
    for token in done.token_ids:  # each id is the argmax after everything before it
        assert token == int(engine.model(seq).logits[0, -1].argmax())
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    assert done.finish_reason == "length" and len(done.token_ids) == 6
    assert done.context.tokens == seq.shape[1]
    # the returned context continues the stream exactly where the answer ended
    after = engine.model(torch.tensor([[done.context.last_token]]), memory=done.context.memory)
    torch.testing.assert_close(after.logits[0, -1], engine.model(seq).logits[0, -1])


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_of_different_lengths_equals_each_prompt_alone(name):
    engine = make_engine(name)
    prompts = ["x", "a longer prompt of many folds", "mid size", "abc", "a longer prompt of so"]
    contexts = [None, None, engine.read("some context"), None, engine.read("ctx")]
    config = SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=40, top_p=0.95, seed=3)
    batch = engine.complete(prompts, contexts, config)
    for prompt, context, got in zip(prompts, contexts, batch, strict=True):
        (alone,) = engine.complete([prompt], [context], config)
        assert got.token_ids == alone.token_ids and got.text == alone.text
    again = engine.complete(prompts, contexts, config)
    assert [c.token_ids for c in again] == [c.token_ids for c in batch]  # same seed, same text
    other = engine.complete(prompts, contexts, config.replace(seed=4))
    assert [c.token_ids for c in other] != [c.token_ids for c in batch]


@pytest.mark.parametrize("name", list(MODELS))
def test_rows_at_one_phase_share_decode_steps_each_with_its_own_config(name):
    """Streams at positions 5, 5 and 9 (one phase of a w = 4 fold) and a fresh one: rows at one
    position share decode steps in every model, and at one phase in the folded ones; each
    row's answer, under its own sampling config, is the one it gets alone."""
    engine = make_engine(name)
    prompts = ["abcdef", "ab", "abc", ""]
    contexts = [None, engine.read("wxyz"), engine.read("0123456"), None]
    configs = [
        SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eod=False),
        SamplingConfig(max_new_tokens=4, temperature=1.2, top_p=0.9, seed=1),
        SamplingConfig(max_new_tokens=8, repetition_penalty=1.5, top_k=30, seed=7),
        SamplingConfig(max_new_tokens=5, seed=3, stop_at_eod=False),
    ]
    steps = []
    hook = engine.model.register_forward_pre_hook(
        lambda _, args: steps.append(args[0].shape[0]) if args[0].shape[1] == 1 else None
    )
    stream = engine.stream_batch(prompts, contexts, configs)
    pieces = ["", "", "", ""]
    for row, piece in stream:
        pieces[row] += piece
    hook.remove()
    folded = engine.model.model_type == "folded" and name != "full_attention"
    assert max(steps) == (3 if folded else 2)
    for prompt, context, config, got, text in zip(
        prompts, contexts, configs, stream.completions, pieces, strict=True
    ):
        (alone,) = engine.complete([prompt], [context], config)
        assert got.token_ids == alone.token_ids and got.text == alone.text == text
        assert got.context.tokens == alone.context.tokens
        after = [
            engine.model(torch.tensor([[c.last_token]]), memory=c.memory).logits
            for c in (got.context, alone.context)
        ]
        torch.testing.assert_close(*after)  # the returned contexts continue alike (to rounding)


def test_stream_yields_the_completion_text_and_stops():
    engine = make_engine()
    config = SamplingConfig(max_new_tokens=30, temperature=1.0, seed=1, stop_at_eod=False)
    stream = engine.stream("hello", None, config)
    pieces = list(stream)
    (done,) = engine.complete(["hello"], None, config)
    assert "".join(pieces) == done.text == stream.completion.text
    assert stream.completion.token_ids == done.token_ids
    # a stop string taken from the free text ends the answer before it
    text = done.text
    stop = text[10:12]
    assert stop and stop not in text[:10]
    cut = engine.complete(["hello"], None, config.replace(stop=(stop,)))[0]
    assert cut.text == text[:10] and cut.finish_reason == "stop"

    # end of document: the first eod ends the answer, is left out of the text, is read
    class EodIsThird(ByteTokenizer):
        eod_id = done.token_ids[2]

    eod_engine = Engine(engine.model, EodIsThird())
    ended = eod_engine.complete(["hello"], None, config.replace(stop_at_eod=True))[0]
    assert ended.finish_reason == "stop" and ended.token_ids == done.token_ids[:3]
    assert ended.text == engine.tokenizer.decode(done.token_ids[:2])
    assert ended.context.tokens == 5 + 3 and ended.context.last_token == done.token_ids[2]


def test_empty_stream_starts_at_a_document_boundary():
    engine = make_engine()
    config = SamplingConfig(max_new_tokens=3, temperature=0.0, stop_at_eod=False)
    (done,) = engine.complete([""], None, config)
    (explicit,) = engine.complete([""], [engine.read([engine.tokenizer.eod_id])], config)
    assert done.token_ids == explicit.token_ids and done.context.tokens == 4


# -- context states ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_state_continues_exactly_like_the_uninterrupted_stream(name, tmp_path):
    engine = make_engine(name)
    ids = torch.randint(0, 256, (1, 37)).tolist()[0]
    full = engine.model(torch.tensor([ids])).logits
    for split in (1, 2, 9, 24):
        first = read_context(engine.model, ids[:split], chunk_size=5)
        engine.save_state(tmp_path / "s.state", first)
        fresh = make_engine(name)  # another instance with the same weights
        loaded = fresh.load_state(tmp_path / "s.state")
        assert loaded.tokens == split
        rest = torch.tensor([[first.last_token] + ids[split:]])
        uninterrupted = engine.model(rest, memory=first.memory).logits
        resumed = fresh.model(rest, memory=loaded.memory).logits
        assert torch.equal(uninterrupted, resumed)
        torch.testing.assert_close(resumed, full[:, split - 1 :])


def test_state_for_another_model_or_tokenizer_is_refused(tmp_path):
    engine = make_engine()
    path = tmp_path / "s.state"
    engine.save_state(path, engine.read("some context"))
    with pytest.raises(ContextStateError, match="another model"):
        make_engine(seed=1).load_state(path)  # other weights
    with pytest.raises(ContextStateError, match="another model"):
        make_engine(memory_len=2).load_state(path)  # other config
    with pytest.raises(ContextStateError, match="'rmt' model"):
        make_engine("rmt").load_state(path)

    class OtherBytes(ByteTokenizer):
        def fingerprint(self) -> str:
            return "bytes-v2"

    with pytest.raises(ContextStateError, match="another tokenizer"):
        Engine(engine.model, OtherBytes()).load_state(path)
    (tmp_path / "junk").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ContextStateError, match="not a foldformer context state"):
        engine.load_state(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="missing"):
        engine.load_state(tmp_path / "missing")
    # an empty context and a one-token one round-trip too (no tensors yet)
    for context in (ContextState(), engine.read("x")):
        engine.save_state(path, context)
        assert engine.load_state(path) == context


@pytest.mark.parametrize("model_type", ["peer_rmt", "peer_infini", "peer_xl"])
def test_peers_generate_in_batches_and_resume_from_a_saved_state(model_type, tmp_path):
    from foldformer.variants.peers import PEERS, peer_available

    if not peer_available(model_type):
        pytest.skip(
            f"{PEERS[model_type].package} is not installed (pip install 'foldformer[peers]')"
        )
    memory = {"peer_rmt": 2, "peer_infini": 0, "peer_xl": 3}[model_type]
    torch.manual_seed(0)
    model = build_model(model_type, {**SHAPE, "memory_len": memory}).eval()
    engine = Engine(model, ByteTokenizer())
    prompts, config = ["ab", "a longer one"], SamplingConfig(max_new_tokens=5, seed=2)
    batch = engine.complete(prompts, None, config)
    assert [c.token_ids for c in batch] == [engine.complete([p], None, config)[0].token_ids
                                            for p in prompts]  # fmt: skip
    ids = list(b"a stream of some thirty tokens or so")
    first = engine.read(ids[:13])
    engine.save_state(tmp_path / "s.state", first)
    loaded = engine.load_state(tmp_path / "s.state")
    rest = torch.tensor([[first.last_token] + ids[13:]])
    with torch.no_grad():
        assert torch.equal(model(rest, memory=first.memory).logits,
                           model(rest, memory=loaded.memory).logits)  # fmt: skip


def test_cuda_graph_option_reads_like_eager_on_a_cpu():
    """On a CPU the option is ignored: the same state, bit for bit, and nothing captured."""
    engine = make_engine()
    engine.chunk_size = 8
    graphed = Engine(engine.model, ByteTokenizer(), chunk_size=8, cuda_graph=True)
    text = "It was the best of times, it was the worst of times. " * 3
    plain = engine.read(text[60:], engine.read(text[:60]))
    other = graphed.read(text[60:], graphed.read(text[:60]))
    assert plain.tokens == other.tokens and plain.last_token == other.last_token
    for name, tensor in plain.memory.state_dict().items():
        assert torch.equal(other.memory.state_dict()[name], tensor), name
    assert graphed._graphs == {}


def test_a_read_continued_mid_fold_is_cut_into_chunks_that_each_read_something():
    """With cuda_graph, a read continued p tokens into a fold goes to the fold's end first
    when chunks are whole folds (the rest replay a graph); any other chunk size keeps its
    plain chunks. A fold longer than the chunk (the unfolded model: w = 1e9 > 2048) gave a
    negative first cut, then an empty chunk: "input_ids is empty", or tokens read twice."""
    assert chunk_starts(40, 16, 3, 8) == [0, 13, 29]  # 3 + 13 = 16: whole folds from there
    assert chunk_starts(40, 16, 0, 8) == [0, 16, 32]
    assert chunk_starts(5, 16, 3, 8) == [0]
    assert chunk_starts(3000, 2048, 3000, FULL_ATTENTION_SEGMENT) == [0, 2048]  # was 0, -952, 1096
    assert chunk_starts(40, 16, 16, 32) == [0, 16, 32]  # was 0, 0, 16, 32: an empty chunk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_engine_reads_like_eager_and_captures_once():
    """Reads continued mid-fold realign to whole folds and replay the one captured graph: the
    state and the greedy answer are those of eager reading."""
    torch.manual_seed(0)
    shape = dict(vocab_size=257, d_model=64, n_layers=2, n_heads=2, segment_len=8, memory_len=8)
    model = build_model("folded", shape).cuda().eval()
    eager = Engine(model, ByteTokenizer(), chunk_size=64)
    graphed = Engine(model, ByteTokenizer(), chunk_size=64, cuda_graph=True)
    ids = torch.randint(0, 256, (2000,)).tolist()
    states = []
    for engine in (eager, graphed):
        context = None
        for start, end in ((0, 501), (501, 1203), (1203, 2000)):  # stops mid-fold each time
            context = engine.read(ids[start:end], context)
        states.append(context)
    assert len(graphed._graphs) == 1
    for name, tensor in states[0].memory.state_dict().items():
        torch.testing.assert_close(states[1].memory.state_dict()[name], tensor)
    config = SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eod=False)
    engines = (eager, graphed)
    answers = [
        e.complete(["?"], [s], config)[0].token_ids for e, s in zip(engines, states, strict=True)
    ]
    assert answers[0] == answers[1]


def test_a_cancelled_row_ends_and_the_others_answer_as_alone():
    """cancelled(row) ends that row at the next step ("cancelled"); the batch's other rows
    give exactly their answers alone."""
    engine = make_engine()
    contexts = [engine.read("abcd" * 3), engine.read("wxyz" * 3)]  # one phase: one batch
    config = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_at_eod=False)
    steps = {"row 0": 0}

    def cancelled(row: int) -> bool:
        if row == 0:
            steps["row 0"] += 1
        return row == 0 and steps["row 0"] > 5

    stream = engine.stream_batch([" Q", " Q"], contexts, config, cancelled=cancelled)
    for _ in stream:
        pass
    first, second = stream.completions
    assert first.finish_reason == "cancelled" and len(first.token_ids) == 5
    (alone,) = engine.complete([" Q"], [contexts[1]], config)
    assert second.finish_reason == "length" and second.token_ids == alone.token_ids
