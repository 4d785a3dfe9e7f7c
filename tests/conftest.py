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


# -- invariant checks shared by the model families' tests ----------------------------------------


def assert_streams_like_one_call(model, ids: torch.Tensor) -> None:
    """DESIGN.md §3 invariant 1 on a model in eval mode: chunks of any sizes, token by
    token steps, and batch rows split mid-segment and joined in another order all give the
    logits of one call."""
    with torch.no_grad():
        whole = model(ids)
        for sizes in ([5, 1, 6, 7], [3, 3, 3, 3, 3, 4], [8, 11]):
            memory, logits = None, []
            for chunk in ids.split(sizes, dim=1):
                out = model(chunk, memory)
                memory, logits = out.memory, logits + [out.logits]
            torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=0, atol=1e-10)
        memory, steps = None, []
        for t in range(ids.shape[1]):
            out = model.step(ids[:, t], memory)
            memory, steps = out.memory, steps + [out.logits]
        torch.testing.assert_close(torch.stack(steps, 1), whole.logits, rtol=0, atol=1e-10)
        # rows split mid-segment and joined in another order continue the same streams
        first = model(ids[:, :6]).memory
        joined = model.state_class.concat([first.index([2]), first.index([0, 1])])
        rest = model(ids[[2, 0, 1], 6:], joined).logits
        torch.testing.assert_close(rest, whole.logits[[2, 0, 1], 6:], rtol=0, atol=1e-10)


def flat_grads(model) -> torch.Tensor:
    """Every parameter's gradient, flattened into one vector (parameters without one left out)."""
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def embedding_grads(model, ids: torch.Tensor, bptt: int = 0) -> torch.Tensor:
    """Per-segment gradient norm of the last segment's loss w.r.t. the token embeddings."""
    embed = model.embed if hasattr(model, "embed") else model.net.token_emb  # peers: net.token_emb
    outputs = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        outputs.append(output)

    handle = embed.register_forward_hook(keep)
    w = model.config.segment_len
    labels = torch.full_like(ids, -100)
    labels[:, -w:] = ids[:, -w:]
    model(ids, labels=labels, bptt=bptt).loss.backward()
    handle.remove()
    grad = torch.cat([o.grad for o in outputs], dim=1)  # (B, T, d): one call or one a segment
    return torch.linalg.vector_norm(grad.view(ids.shape[0], -1, w, grad.shape[-1]), dim=(0, 2, 3))


def assert_compiled_segment_step_changes_nothing(make_model, ids: torch.Tensor) -> None:
    """`compile_fold` (aot_eager: no C++ build on a CPU) compiles the model's whole-segment
    step, the forward pass runs through it (dynamo traced a graph of it), and the logits and
    gradients are those of the eager model."""
    from torch._dynamo.testing import CompileCounterWithBackend

    results = []
    for compiled in (False, True):
        model = make_model()
        if compiled:
            torch._dynamo.reset()
            counter = CompileCounterWithBackend("aot_eager")
            assert model.compile_fold(backend=counter)
            assert model.fold_step is model.__dict__["_fold_step"]
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits, flat_grads(model)))
    assert counter.frame_count >= 1 and counter.op_count > 0  # the step ran compiled
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)
