"""In-house baselines (DESIGN.md §5): they stream exactly like the folded model, keep rows
apart, stop or carry gradients as their design says, and round-trip through save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_compiled_segment_step_changes_nothing, embedding_grads
from foldformer.model import apply_rotary, rotary_tables
from foldformer.models import build_model, load_model

SHAPE = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
VARIANTS = [
    ("sliding_window", dict(segment_len=4, memory_len=0)),
    ("sliding_window", dict(segment_len=1, memory_len=0)),  # each token sees only itself
    ("transformer_xl", dict(segment_len=4, memory_len=3)),  # m < w
    ("transformer_xl", dict(segment_len=3, memory_len=7)),  # m > w: FIFO over segments
    ("transformer_xl", dict(segment_len=4, memory_len=0, norm="layernorm")),
    ("rmt", dict(segment_len=4, memory_len=3)),
    ("rmt", dict(segment_len=3, memory_len=5, activation="swiglu")),
]


def make(model_type: str, **overrides):
    torch.manual_seed(0)
    return build_model(model_type, {**SHAPE, **overrides}).double().eval()


def variant_id(case):
    model_type, values = case
    return model_type + ":" + ",".join(f"{k}={v}" for k, v in values.items())


def stream(model, ids, sizes, memory=None):
    logits = []
    for chunk in ids.split(sizes, dim=1):
        out = model(chunk, memory)
        memory = out.memory
        logits.append(out.logits)
    return torch.cat(logits, dim=1), memory


@pytest.mark.parametrize("case", VARIANTS, ids=variant_id)
def test_chunked_and_token_by_token_match_one_call(case):
    model_type, values = case
    model = make(model_type, **values)
    ids = torch.randint(0, 50, (3, 29))
    whole = model(ids)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        cuts = sorted(torch.randperm(28, generator=gen)[:5].add(1).tolist())
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [29], strict=True)]
        chunked, state = stream(model, ids, sizes)
        torch.testing.assert_close(chunked, whole.logits, rtol=0, atol=1e-10)
        for name, tensor in whole.memory.state_dict().items():
            torch.testing.assert_close(state.state_dict()[name], tensor, rtol=0, atol=1e-10)
    state, steps = None, []
    for t in range(ids.shape[1]):
        out = model.step(ids[:, t], state)
        state = out.memory
        steps.append(out.logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole.logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["sliding_window", "transformer_xl", "rmt"])
def test_row_logits_do_not_depend_on_other_rows(model_type):
    model = make(model_type, segment_len=4, memory_len=0 if model_type == "sliding_window" else 3)
    ids = torch.randint(0, 50, (4, 21))
    batched = model(ids).logits
    first = model(ids[:, :6])  # mid-segment: the state is split by row
    for row in range(4):
        alone = model(ids[row : row + 1]).logits
        torch.testing.assert_close(alone[0], batched[row], rtol=0, atol=1e-10)
        rest = model(ids[row : row + 1, 6:], first.memory.index([row])).logits
        torch.testing.assert_close(rest[0], batched[row, 6:], rtol=0, atol=1e-10)
    # rows split and joined again (micro-batches of a step) continue the same streams
    joined = model.state_class.concat([first.memory.index([0, 1]), first.memory.index([2, 3])])
    torch.testing.assert_close(model(ids[:, 6:], joined).logits, batched[:, 6:], rtol=0, atol=1e-10)


def reference_sliding_window(model, ids):
    """Dense attention with an explicit band mask: the definition, at stream positions."""
    x = model.embed(ids)
    B, T = ids.shape
    w = model.config.segment_len
    cos, sin = rotary_tables(T, model.config.head_dim, model.config.rope_base, x.device, x.dtype)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = (j <= i) & (j > i - w)
    for block in model.blocks:
        attn = block.attn
        q, k, v = attn.qkv(block.norm_attn(x)).view(B, T, 3, attn.n_heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.norm_mlp(x))
    return model.head(model.norm_out(x))


def test_sliding_window_is_banded_causal_attention():
    model = make("sliding_window", segment_len=5)
    ids = torch.randint(0, 50, (2, 23))
    # Rotary tables are float32 angles: positions differ between the two computations, so
    # agreement is to float32 angle precision, not to the last bit.
    torch.testing.assert_close(
        model(ids).logits, reference_sliding_window(model, ids), rtol=0, atol=1e-8
    )
    # Its state stays within one previous block plus the current one: constant memory.
    state = model(torch.randint(0, 50, (2, 203))).memory
    assert state.keys.shape[3] == 5 + 203 % 5


def test_sliding_window_sees_nothing_beyond_its_window():
    model = make("sliding_window", segment_len=4)
    ids = torch.randint(0, 50, (1, 30))
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 50
    a, b = model(ids).logits[0], model(changed).logits[0]
    reach = 3 + model.config.n_layers * 3  # each layer reaches w − 1 = 3 tokens further back
    assert not torch.allclose(a[reach], b[reach])
    torch.testing.assert_close(a[reach + 1 :], b[reach + 1 :], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["sliding_window", "transformer_xl", "rmt"])
def test_reset_restarts_a_row_like_a_fresh_stream(model_type):
    model = make(model_type, segment_len=4, memory_len=0 if model_type == "sliding_window" else 3)
    history, fresh = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 9))
    state = model(history).memory
    out = model(fresh, state, reset_mask=torch.tensor([True, False]))
    alone = model(fresh).logits
    torch.testing.assert_close(out.logits[0], alone[0], rtol=0, atol=1e-10)
    assert not torch.allclose(out.logits[1], alone[1])
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[0, 8] = True  # a (B, T) mask: reset before token 8, on a segment boundary
    out = model(torch.cat([history, fresh], dim=1), reset_mask=mask)
    torch.testing.assert_close(out.logits[0, 8:], alone[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="boundary"):
        model(fresh[:, :3], model(history[:, :6]).memory, reset_mask=torch.tensor([True, False]))


def test_transformer_xl_gradient_stops_at_the_previous_segment():
    model = make("transformer_xl", segment_len=4, memory_len=4).train()
    grads = embedding_grads(model, torch.randint(0, 50, (2, 24)))  # 6 segments
    assert (grads[:-1] == 0).all(), grads  # the cache is gradient-stopped
    assert grads[-1] > 0
    # ... but the forward pass does read the cache: changing segment 4 changes segment 5.
    ids = torch.randint(0, 50, (1, 24))
    changed = ids.clone()
    changed[0, 19] = (ids[0, 19] + 1) % 50
    assert not torch.allclose(model(ids).logits[0, 20:], model(changed).logits[0, 20:])


def test_rmt_gradient_crosses_every_segment_and_bptt_truncates_it():
    model = make("rmt", segment_len=4, memory_len=2).train()
    ids = torch.randint(0, 50, (2, 24))
    assert (embedding_grads(model, ids, bptt=0) > 0).all()
    grads = embedding_grads(model, ids, bptt=2)  # memory detached after segments 2 and 4
    assert (grads[:4] == 0).all() and (grads[4:] > 0).all(), grads


def test_rmt_compiled_segment_step_gives_the_same_logits_and_gradients():
    """compile_fold compiles RMT's whole-segment pass (as the folded model's fold), so the
    trainer's compile=true runs the loop over segments eagerly around one compiled step."""
    ids = torch.randint(0, 50, (2, 14))  # three whole segments and a partial one
    assert_compiled_segment_step_changes_nothing(
        lambda: make("rmt", segment_len=4, memory_len=3).train(), ids
    )
    # a model without a segment step compiles nothing (the trainer compiles it whole)
    assert not make("transformer_xl", segment_len=4, memory_len=3).compile_fold()


@pytest.mark.parametrize("model_type", ["sliding_window", "transformer_xl", "rmt"])
def test_checkpointing_gives_the_same_gradients(model_type):
    ids = torch.randint(0, 50, (2, 14))
    grads = []
    for checkpoint in (False, True):
        model = make(
            model_type, segment_len=4, memory_len=0 if model_type == "sliding_window" else 3
        )
        model.train()(ids, labels=ids, checkpoint=checkpoint).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_type", ["sliding_window", "transformer_xl", "rmt"])
def test_save_and_load_give_identical_logits(model_type, tmp_path):
    memory_len = 0 if model_type == "sliding_window" else 3
    model = make(model_type, segment_len=4, memory_len=memory_len, tie_embeddings=False).float()
    ids = torch.randint(0, 50, (2, 11))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    for model_type in ("sliding_window", "transformer_xl", "rmt"):
        model = make(
            model_type, segment_len=4, memory_len=0 if model_type == "sliding_window" else 3
        )
        ids = torch.randint(0, 50, (2, 14))
        state = model(ids[:, :7]).memory  # mid-segment
        save_file(state.state_dict(), tmp_path / "state.safetensors")
        loaded = type(state).from_state_dict(load_file(tmp_path / "state.safetensors"))
        torch.testing.assert_close(model(ids[:, 7:], loaded).logits, model(ids).logits[:, 7:])


def test_configs_check_their_values():
    from foldformer.config import ConfigError

    with pytest.raises(ConfigError, match="memory_len must be 0, got 4"):
        build_model("sliding_window", {**SHAPE, "memory_len": 4})
    with pytest.raises(ConfigError, match="d_model=30 is not divisible by n_heads=4"):
        build_model("transformer_xl", {**SHAPE, "d_model": 30})
    with pytest.raises(ConfigError, match="d_modle"):
        build_model("rmt", {"d_modle": 3})
    with pytest.raises(TypeError, match="memory must be the RMTState"):
        make("rmt")(torch.zeros(1, 3, dtype=torch.long), make("transformer_xl").initial_state(1))
