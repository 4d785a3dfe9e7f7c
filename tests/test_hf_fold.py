"""foldformer.fold / wrap_rmt on tiny randomly initialised Hugging Face decoders of each family
(GPT-2, Llama, Qwen2, Qwen3; nothing downloaded): the DESIGN.md §3 invariants, m = 0 as the
unfolded decoder, save/load, the CLI path (train --hf_model, eval, generate), one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

import foldformer
from conftest import (
    assert_compiled_segment_step_changes_nothing,
    assert_streams_like_one_call,
    embedding_grads,
    flat_grads,
)
from foldformer.cli import console
from foldformer.config import ConfigError
from foldformer.models import build_model, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

BOOKS = Path(__file__).resolve().parent / "fixtures" / "books"
V = 32
SMALL = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
FAMILIES = {
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=64),
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
}
WRAPS = {"fold": foldformer.fold, "rmt": foldformer.wrap_rmt}
CASES = [(family, wrap) for family in FAMILIES for wrap in WRAPS]


def decoder(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family]())


def make(family: str, wrap: str, memory_len: int = 3, segment_len: int = 4):
    torch.manual_seed(1)  # M0 of the RMT wrapping
    return WRAPS[wrap](decoder(family), memory_len=memory_len, segment_len=segment_len)


# -- invariant 1: streaming equivalence ---------------------------------------------------------


@pytest.mark.parametrize(("family", "wrap"), CASES)
def test_chunks_tokens_and_batch_composition_give_one_calls_logits(family, wrap):
    model = make(family, wrap).double().eval()
    ids = torch.randint(0, V, (3, 19), generator=torch.Generator().manual_seed(0))
    assert_streams_like_one_call(model, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_zero_is_the_unfolded_decoder_on_each_segment(family):
    hf = decoder(family).double().eval()
    model = foldformer.fold(hf, memory_len=0, segment_len=8)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        folded = model(ids).logits
        for start in range(0, 20, 8):  # independent segments, positions from 0 each time
            expected = hf(ids[:, start : start + 8]).logits
            torch.testing.assert_close(folded[:, start : start + 8], expected, rtol=0, atol=1e-12)


def test_the_memory_is_read_a_fold_sees_the_previous_one():
    """m > 0 changes the second segment's logits (and not the first one's beyond M0)."""
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, :4] = (other[0, :4] + 1) % V
    model = make("llama", "fold").double().eval()
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    assert not torch.allclose(a[:, 4:], b[:, 4:])


# -- invariant 3: bounded memory over many folds ------------------------------------------------


@pytest.mark.parametrize(("family", "wrap"), CASES)
def test_memory_stays_finite_and_of_constant_size_over_many_folds(family, wrap):
    """10^4 folds for the fold of GPT-2 (LayerNorm) and Llama (RMSNorm; Qwen2/3 share it), 2000
    for the other cases: a Hugging Face forward costs about half a millisecond a fold here."""
    model = make(family, wrap).eval()
    calls = 40 if wrap == "fold" and family in ("gpt2", "llama") else 8
    gen = torch.Generator().manual_seed(0)
    memory, sizes, norms = None, set(), []
    with torch.no_grad():
        for _ in range(calls):  # 250 folds of 4 tokens a call
            memory = model(torch.randint(0, V, (1, 1000), generator=gen), memory, logits_to_keep=1)
            memory = memory.memory
            sizes.add(memory.memory.shape)
            norms.append(memory.memory.norm().item())
    assert len(sizes) == 1, sizes
    assert all(torch.isfinite(torch.tensor(norms))), norms
    assert max(norms[calls // 2 :]) <= 2 * max(norms[: max(1, calls // 10)]), norms


# -- invariant 4: gradient through folds --------------------------------------------------------


@pytest.mark.parametrize(("family", "wrap"), CASES)
def test_gradient_reaches_the_first_fold_and_bptt_truncates_it(family, wrap):
    model = make(family, wrap).double().train()
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))  # 6 folds
    full = embedding_grads(model, ids, bptt=0)
    assert (full > 0).all(), full
    assert model.initial_memory.grad.abs().sum() > 0  # M0 learns
    model.zero_grad()
    truncated = embedding_grads(model, ids, bptt=2)  # detached after folds 2 and 4
    assert (truncated[:4] == 0).all() and (truncated[4:] > 0).all(), truncated


@pytest.mark.parametrize("wrap", WRAPS)
def test_checkpointing_and_chunked_loss_give_the_same_gradients(wrap):
    ids = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for checkpoint, return_logits in ((False, True), (True, False)):
        model = make("gpt2", wrap).double().train()
        for module in model.modules():  # GPT-2's dropout (0.1) would draw other masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = model(ids, labels=ids, checkpoint=checkpoint, return_logits=return_logits)
        out.loss.backward()
        losses.append(out.loss)
        grads.append(flat_grads(model))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("wrap", WRAPS)
def test_compiled_fold_step_gives_the_same_logits_and_gradients(wrap):
    """compile_fold compiles the fold's (RMT: the segment's) pass through the decoder, without
    its key/value cache, for hf_folded and hf_rmt alike."""
    ids = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(0))

    def model():
        model = make("gpt2", wrap).double().train()
        for module in model.modules():  # GPT-2's dropout would draw other masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    assert_compiled_segment_step_changes_nothing(model, ids)


# -- the start, saving and loading --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_in_starts_as_a_scaled_identity_giving_memory_rows_the_embeddings_scale(family):
    model = make(family, "fold")
    weight = model.fold_in.weight
    scale = weight[0, 0].item()
    torch.testing.assert_close(weight, scale * torch.eye(weight.shape[0]))
    rms = model.embed.weight.pow(2).mean().sqrt().item()
    assert scale == pytest.approx(rms, rel=1e-5)  # the final norms start with weight 1


@pytest.mark.parametrize("wrap", WRAPS)
def test_gpt2_positions_are_embeddings_left_out_of_the_non_embedding_count(wrap):
    """As every model counts (docs/baselines.md): compare matches sizes on this count."""
    model = make("gpt2", wrap)
    base = model.decoder.base_model  # tied head: wte is the only token matrix
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total - base.wte.weight.numel() - base.wpe.weight.numel()


@pytest.mark.parametrize(("family", "wrap"), [("gpt2", "fold"), ("qwen3", "rmt")])
def test_save_and_load_give_the_same_model_without_the_source_folder(family, wrap, tmp_path):
    model = make(family, wrap).eval()
    hf_dir = tmp_path / "hf"
    model.decoder.save_pretrained(hf_dir)
    built = build_model(f"hf_{'folded' if wrap == 'fold' else 'rmt'}",
                        dict(hf_model=str(hf_dir), memory_len=3, segment_len=4)).eval()  # fmt: skip
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        if wrap == "fold":  # M0 and fold_in start alike; the RMT's M0 is drawn
            torch.testing.assert_close(built(ids).logits, expected)
    model.save_pretrained(tmp_path / "saved")
    assert "hf_model" not in (tmp_path / "saved" / "config.json").read_text()
    for path in hf_dir.iterdir():
        path.unlink()  # the saved model holds its weights
    loaded = load_model(tmp_path / "saved").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


LLAMA = FAMILIES["llama"]().to_dict()


@pytest.mark.parametrize(
    ("model_type", "values", "named"),
    [
        ("hf_folded", dict(hf_config={"model_type": "bert"}), "model_type='bert' is not supported"),
        (
            "hf_folded",
            dict(hf_model="/no/such/dir"),
            "hf_model='/no/such/dir' is not a Hugging Face",
        ),
        ("hf_folded", {}, "hf_model or hf_config must name"),
        ("hf_folded", dict(hf_config=LLAMA, memory_len=40, segment_len=40), "spans 80 positions"),
        ("hf_rmt", dict(hf_config=LLAMA, memory_len=30, segment_len=8), r"spans 68 positions \(2"),
        ("hf_folded", dict(hf_config=LLAMA, segment_len=0), "segment_len must be an integer >= 1"),
        ("hf_rmt", dict(hf_config=LLAMA, memory_len=0), "memory_len must be >= 1"),
        (
            "hf_folded",
            dict(hf_config=LLAMA, vocab_size=33),
            "vocab_size=33 is larger than the deco",
        ),
    ],
)
def test_bad_configs_are_one_line_naming_the_value(model_type, values, named):
    with pytest.raises(ConfigError, match=named) as error:
        build_model(model_type, {"memory_len": 4, "segment_len": 8, **values})
    assert "\n" not in str(error.value)


def test_sliding_window_decoders_are_refused():
    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ConfigError, match="sliding-window attention: not supported"):
        foldformer.fold(AutoModelForCausalLM.from_config(config), memory_len=2, segment_len=4)


# -- the command line: train from a Hugging Face folder, then eval and generate ----------------


def test_train_from_a_hugging_face_folder_then_eval_and_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("foldformer.data.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMALL, "vocab_size": 257})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    assert console(["train", "--data", str(BOOKS / "pg35.txt"), "--model_type", "hf_folded",
                    "--hf_model", str(tmp_path / "hf"), "--memory_len", "4", "--segment_len", "8",
                    "--seq_len", "32", "--batch_size", "4", "--max-steps", "3",
                    "--warmup_steps", "1", "--eval_every", "0", "--progress", "false",
                    "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    model = load_model(out / "final")
    assert type(model).__name__ == "FoldedHFDecoder" and model.config.memory_len == 4
    assert console(["eval", "lm", str(out / "final"), "--data", str(BOOKS / "pg84.txt"),
                    "--max-tokens", "256", "--device", "cpu", "--out", str(tmp_path / "lm")]) == 0  # fmt: skip
    assert console(["generate", str(out / "final"), "--prompt", "The", "--max-new-tokens", "5",
                    "--seed", "0", "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out
