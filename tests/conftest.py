"""Fixtures shared by test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a busy 2-core machine is not oversubscribed);
    use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random folded model with the byte tokenizer, as a training run's model directory."""
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.models import build_model

    directory = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    shape = dict(vocab_size=257, d_model=16, n_layers=2, n_heads=2, segment_len=8, memory_len=4)
    build_model("folded", shape).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory
