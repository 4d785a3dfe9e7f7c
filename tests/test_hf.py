"""Hugging Face integration: after `import foldformer`, AutoConfig/AutoModelForCausalLM/
AutoTokenizer load foldformer folders (old and new), generate() returns foldformer's greedy
tokens at constant memory, and save_pretrained folders load back in foldformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import foldformer
from foldformer.config import ConfigError
from foldformer.data.tokenizers import ByteTokenizer, load_tokenizer, train_bpe
from foldformer.generate import default_chunk_size, greedy_generate
from foldformer.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GATED = FIXTURES / "checkpoints" / "folded_gate"  # written before foldformer.hf existed
BOOK = FIXTURES / "books" / "pg35.txt"


def keys(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.fixture(params=["plain", "gated"])
def folder(request, tiny_checkpoint):
    return tiny_checkpoint if request.param == "plain" else GATED


def test_auto_classes_load_foldformer_checkpoints(folder):
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, foldformer.FoldedHFConfig)
    assert config.to_folded_config() == foldformer.FoldedTransformer.from_pretrained(folder).config
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, foldformer.FoldedForCausalLM)
    reference = load_model(folder)
    ids = torch.randint(0, config.vocab_size, (2, 23))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert config.hidden_size == config.d_model  # transformers' names for the same fields


def test_generate_returns_the_greedy_tokens_of_foldformer(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = torch.randint(0, model.config.vocab_size, (2, 29))  # several folds, then a partial
    out = model.generate(prompt, max_new_tokens=17, do_sample=False)
    expected = greedy_generate(load_model(folder), prompt, 17)
    assert torch.equal(out[:, :29], prompt) and torch.equal(out[:, 29:], expected)


def test_generate_reads_a_long_prompt_fold_by_fold_at_constant_memory(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    lengths, kept = [], []
    forward = model.model.forward

    def recording(input_ids, *args, **kwargs):
        out = forward(input_ids, *args, **kwargs)
        lengths.append(input_ids.shape[1])
        kept.append(out.logits.shape[1])
        return out

    model.model.forward = recording
    caches = {}
    for n in (5 * 8 + 3, 2 * default_chunk_size(model.model) + 8 * 40 + 3):
        prompt = torch.randint(0, 256, (1, n))
        out = model.generate(
            prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True
        )
        caches[n] = out.cache
    assert max(lengths) <= default_chunk_size(model.model) and max(kept) == 1
    short, long = caches.values()
    assert isinstance(long, foldformer.FoldCache) and long.seen_tokens == list(caches)[1] + 5
    shapes = [{k: t.shape for k, t in c.state.state_dict().items()} for c in (short, long)]
    assert shapes[0] == shapes[1]  # the same state after 43 or 4419 tokens


def test_forward_takes_hf_labels_and_continues_a_stream_through_its_cache(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    reference = load_model(tiny_checkpoint)
    ids = torch.randint(0, 256, (2, 21))
    loss = model(ids, labels=ids).loss  # transformers' convention: shifted inside
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(loss, reference(ids, labels=labels).loss)
    first = model(ids[:, :10])
    second = model(ids[:, 10:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), reference(ids).logits)


def test_save_pretrained_writes_foldformer_names_and_loads_in_foldformer(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path)
    assert keys(tmp_path) == keys(folder)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "FoldedForCausalLM"
    ]
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    again = load_model(tmp_path)  # foldformer's loader reads the transformers folder
    torch.testing.assert_close(again(ids).logits, load_model(folder)(ids).logits)
    fresh = foldformer.FoldedForCausalLM(foldformer.FoldedHFConfig(vocab_size=40, d_model=16))
    fresh.save_pretrained(tmp_path / "fresh")
    assert "embed.weight" in keys(tmp_path / "fresh") and "head.weight" not in keys(
        tmp_path / "fresh"
    )
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh").model
    assert again.head.weight is again.embed.weight  # tied, as foldformer saves it


def test_bad_input_is_one_error_naming_it(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="attention_mask must be all ones"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(TypeError, match="FoldCache"):
        model(ids, cache=object())
    with pytest.raises(ConfigError, match="n_heads=3"):
        foldformer.FoldedHFConfig(d_model=16, n_heads=3)
    with pytest.raises(ConfigError, match="model_type 'rmt' has no transformers class"):
        AutoModelForCausalLM.from_pretrained(FIXTURES / "checkpoints" / "rmt")


def test_auto_tokenizer_loads_saved_byte_and_bpe_tokenizers(tmp_path):
    text = "Grüße, 世界! The time machine\n"
    ByteTokenizer().save(tmp_path / "bytes")
    bpe = train_bpe([str(BOOK)], vocab_size=300, progress=False)
    bpe.save(tmp_path / "bpe")
    for name, tokenizer in (("bytes", ByteTokenizer()), ("bpe", bpe)):
        auto = AutoTokenizer.from_pretrained(tmp_path / name)
        assert auto(text)["input_ids"] == tokenizer.encode(text), name
        assert auto.eos_token_id == tokenizer.eod_id and len(auto) == tokenizer.vocab_size
        assert auto.decode(tokenizer.encode(text)) == text
        loaded = load_tokenizer(tmp_path / name)  # and foldformer still reads the folder
        assert type(loaded) is type(tokenizer) and loaded.fingerprint() == tokenizer.fingerprint()


def test_byte_tokenizer_folders_written_before_still_load(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"type": "bytes"}) + "\n")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
