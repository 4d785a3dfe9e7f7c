"""Streaming inference for any model that follows the project's protocol.

A folded model reads an unbounded stream through a fixed (m + w)-position fold, so a context of a
million tokens costs the memory of one chunk. These helpers feed a context chunk by chunk under
``torch.no_grad()`` and ask for logits only where they are needed (``logits_to_keep``), so peak
memory does not grow with the context length::

    state = ingest(model, context_ids)                       # constant memory for any length
    answer = greedy_generate(model, question_ids, 8, memory=state)
    losses = score(model, context_ids, target_ids)           # per-token losses of the targets

They work the same for a full-attention model (``segment_len`` huge, ``memory_len`` 0): its state
is a growing key/value cache, as its design implies.

On top of them, for text: `SamplingConfig` (temperature, top-k, top-p, repetition penalty, stop
strings, seed), `ContextState` (a stream that can be continued, saved and loaded, refused by
another model or tokenizer) and `Engine` (a model with its tokenizer)::

    engine = Engine.load("runs/x/final")
    book = engine.read(text, progress=True)
    engine.save_state("book.state", book)
    for piece in engine.stream("Q: who?", engine.load_state("book.state"), SamplingConfig(seed=0)):
        print(piece, end="")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from foldformer.config import KERNEL_FIELDS, ConfigError, JsonConfig

DEFAULT_CHUNK_TOKENS = 2048


def default_chunk_size(model: nn.Module, target: int = DEFAULT_CHUNK_TOKENS) -> int:
    """About `target` tokens, rounded down to whole folds so most chunks run fused folds."""
    w = int(model.config.segment_len)
    if w >= target:
        return target
    return max(1, target // w) * w


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_batch(ids: Tensor | Iterable[int], device: torch.device | None, name: str) -> Tensor:
    """(T,) or (B, T) ids -> (B, T) long tensor on the model's device (device None: a tensor
    stays where it is, with its integer dtype)."""
    if not isinstance(ids, Tensor):
        ids = torch.tensor(list(ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (T,) or (batch, T), got {tuple(ids.shape)}")
    if device is None:
        return ids
    return ids.to(device=device, dtype=torch.long)


@torch.no_grad()
def ingest(
    model: nn.Module,
    input_ids: Tensor | Iterable[int],
    memory=None,
    chunk_size: int | None = None,
    progress: bool = False,
    cuda_graph: bool = False,
    graphs: dict | None = None,
):
    """Read a context into the model's streaming state without keeping any logits.

    input_ids: (T,) or (B, T). memory: a state to continue, or None for a fresh stream.
    chunk_size: tokens per forward call (default about 2K, whole folds); peak memory is that of
    one chunk for a folded model. Returns the state to pass as ``memory=`` to the next call.
    An empty context returns `memory` unchanged.
    cuda_graph: on a GPU, replay one captured CUDA graph per chunk of whole folds instead of
    launching every kernel of every fold from Python (`ChunkGraph`); the same kernels, so the
    same state. Ignored on a CPU. graphs: a dict that keeps captured graphs from call to call
    (one per batch size and state layout), so a caller reading many contexts captures once.
    """
    # The context stays where it is (a CPU tensor for a long one): only one chunk at a time
    # moves to the model's device, so device memory does not grow with the context.
    device = _device(model)
    ids = _as_batch(input_ids, None, "input_ids")
    chunk_size = chunk_size or default_chunk_size(model)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    T = ids.shape[1]
    if T == 0:
        return memory
    bar = tqdm(total=T, unit="tok", unit_scale=True, desc="ingest", disable=not progress)
    cuda_graph = cuda_graph and device.type == "cuda" and hasattr(model, "read")
    p = memory.tokens_in_segment() if cuda_graph and memory is not None else 0
    graph, starts = None, chunk_starts(T, chunk_size, p, getattr(model.config, "segment_len", 0))
    for start, end in zip(starts, [*starts[1:], T], strict=True):
        chunk = ids[:, start:end].to(device=device, dtype=torch.long)
        if graph is None and cuda_graph and ChunkGraph.applies(model, chunk, memory, chunk_size):
            try:  # found out in the warm-up, before anything is captured
                graph = ChunkGraph.reuse(graphs, model, chunk, memory)
            except GraphUnsupported:
                cuda_graph = False  # the same state, read eagerly
        if graph is not None and chunk.shape[1] == chunk_size:
            memory = graph(chunk)
        else:
            # logits_to_keep=1: the head runs on one position only, the chunk's states are
            # dropped.
            memory = model(chunk, memory=memory, logits_to_keep=1).memory
        bar.update(chunk.shape[1])
    bar.close()
    return memory


def chunk_starts(T: int, chunk_size: int, p: int, w: int) -> list[int]:
    """Where `ingest`'s chunks of a T-token read start. A stream stopped p tokens into a fold,
    read in chunks of whole folds (a CUDA graph's), reads to the fold's end first, so the
    chunks after it are whole folds a graph can replay; other chunk sizes never replay one
    (and chunk_size - p may not be positive), so they keep plain steps of chunk_size."""
    first = chunk_size - p if p and chunk_size % w == 0 else chunk_size
    return [0, *range(first, T, chunk_size)]


class GraphUnsupported(ValueError):
    """A model whose streaming state cannot be replayed by a fixed CUDA graph."""


class ChunkGraph:
    """One chunk of whole folds of a stream, captured once as a CUDA graph and replayed.

    Eager streaming of a small model is bound by kernel launches (a fold is a few dozen small
    kernels; a 16M-token stream at w = 128 is 125K sequential folds). The graph reads its
    chunk from a static id buffer and writes the next state over the static state it started
    from, so each replay continues the stream; `__call__` returns a copy, which the caller may
    keep while the next replay runs. The loop over folds is the model's own
    (`StreamingLM.read`), so the arithmetic is that of ``model(chunk, memory=state)``.
    """

    @staticmethod
    def applies(model: nn.Module, chunk: Tensor, memory, chunk_size: int) -> bool:
        w = getattr(model.config, "segment_len", 0)
        return (
            chunk.is_cuda
            and hasattr(model, "read")
            and chunk.shape[1] == chunk_size
            and chunk_size % w == 0
            # a fresh stream's first chunk runs eagerly: some states gain fields after it (a
            # sliding window's keys, a peer's state), and a graph needs a fixed layout
            and memory is not None
            and memory.tokens_in_segment() == 0
        )

    @classmethod
    def reuse(cls, graphs: dict | None, model: nn.Module, chunk: Tensor, memory) -> ChunkGraph:
        """The graph in `graphs` for this chunk's shape and the state's layout, set to start
        from `memory`; a new one (kept in `graphs`) if there is none."""
        if graphs is None:
            return cls(model, chunk, memory)
        state = memory if memory is not None else model.initial_state(chunk.shape[0])
        tensors = state.state_dict()
        key = (tuple(chunk.shape), *((k, tuple(t.shape), t.dtype) for k, t in tensors.items()))
        if key not in graphs:
            graphs[key] = cls(model, chunk, memory)
        else:
            graphs[key]._load(tensors)
        return graphs[key]

    def __init__(self, model: nn.Module, chunk: Tensor, memory):
        self.model = model
        state = memory if memory is not None else model.initial_state(chunk.shape[0])
        self.start = {k: t.clone() for k, t in state.state_dict().items()}  # where it begins
        self.ids = chunk.clone()
        self.state = type(state).from_state_dict({k: t.clone() for k, t in self.start.items()})
        # Warm up on a side stream (allocator, kernel choice), then capture; the warm-up and
        # the capture both advance the static state, which is put back before the first replay.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may use the GPU while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step()
        self._load(self.start)

    def _step(self) -> None:
        _, new = self.model.read(self.model.inputs(self.ids), self.state, None, 0, False)
        new_tensors = new.state_dict()
        if new_tensors.keys() != self.start.keys():
            raise GraphUnsupported("the state's fields change from chunk to chunk")
        self._load(new_tensors)

    def _load(self, tensors: dict[str, Tensor]) -> None:
        for name, (tensor, _dim) in self.state._tensors().items():
            tensor.copy_(tensors[name])

    def __call__(self, chunk: Tensor):
        self.ids.copy_(chunk)
        self.graph.replay()
        return type(self.state).from_state_dict(
            {k: t.clone() for k, t in self.state.state_dict().items()}
        )


@torch.no_grad()
def stream_losses(
    model: nn.Module,
    input_ids: Tensor | Iterable[int],
    memory=None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, object]:
    """Per-token losses of a stream: entry t is -log p(x_{t+1} | x_1..x_t) (and the state).

    input_ids (T,) or (B, T) -> losses (B, T-1) float32 on the model's device, and the state
    after reading all T tokens. Logits exist for one chunk at a time only.
    """
    ids = _as_batch(input_ids, _device(model), "input_ids")
    B, T = ids.shape
    if chunk_size is None:
        # Logits are (B, chunk, V) floats: keep them near 2**26 elements (256 MB).
        budget = max(1, 2**26 // (B * int(model.config.vocab_size)))
        chunk_size = default_chunk_size(model, min(DEFAULT_CHUNK_TOKENS, budget))
    losses = []
    bar = tqdm(total=T, unit="tok", unit_scale=True, desc="score", disable=not progress)
    for start in range(0, T, chunk_size):
        chunk = ids[:, start : start + chunk_size]
        out = model(chunk, memory=memory)
        memory = out.memory
        targets = ids[:, start + 1 : start + 1 + chunk.shape[1]]
        logits = out.logits[:, : targets.shape[1]].float()
        losses.append(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(B, -1)
        )
        bar.update(chunk.shape[1])
    bar.close()
    return torch.cat(losses, dim=1), memory


@torch.no_grad()
def score(
    model: nn.Module,
    context_ids: Tensor | Iterable[int],
    target_ids: Tensor | Iterable[int],
    memory=None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Per-token losses (nats) of `target_ids` read right after `context_ids`.

    context_ids (C,) or (B, C) with C >= 1 (the last context token predicts the first target);
    target_ids (n,) or (B, n). Returns (B, n) float32 losses. The context is ingested at
    constant memory, then only the targets' logits are computed, chunk by chunk.
    """
    device = _device(model)
    context = _as_batch(context_ids, device, "context_ids")
    targets = _as_batch(target_ids, device, "target_ids")
    if context.shape[1] < 1:
        raise ValueError("score needs at least one context token to predict the first target")
    if context.shape[0] != targets.shape[0]:
        raise ValueError(
            f"context batch {context.shape[0]} does not match target batch {targets.shape[0]}"
        )
    memory = ingest(model, context[:, :-1], memory, chunk_size, progress)
    stream = torch.cat([context[:, -1:], targets], dim=1)
    losses, _ = stream_losses(model, stream, memory, chunk_size, progress)
    return losses


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingConfig(JsonConfig):
    """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1
    turn those filters off; repetition_penalty > 1 discourages the tokens of this call's
    prompt and answer (CTRL, Keskar et al. 2019). seed: the same seed gives the same tokens
    on the same device, whatever else runs in the batch; None draws from torch's global RNG."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # text that ends the answer (left out of it)
    stop_at_eod: bool = True  # the end-of-document token ends the answer
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        checks = (
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 0, ">= 0"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, ">= 0 (0: off)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            (
                "repetition_penalty",
                _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
                "> 0 (1: off)",
            ),
            ("seed", self.seed is None or _is_int(self.seed) and self.seed >= 0, ">= 0 or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def sample_next(
    logits: Tensor,
    config: SamplingConfig,
    generators: list | None = None,
    history: list[list[int]] | None = None,
) -> Tensor:
    """Next token ids (B,) from next-token logits (B, V). history[r]: the ids the repetition
    penalty applies to in row r."""
    logits = logits.float().clone()
    if config.repetition_penalty != 1 and history:
        for row, seen in enumerate(history):
            if seen:
                ids = torch.tensor(sorted(set(seen)), device=logits.device)
                values = logits[row, ids]
                logits[row, ids] = torch.where(
                    values > 0,
                    values / config.repetition_penalty,
                    values * config.repetition_penalty,
                )
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits /= config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p  # the first token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat(
        [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    )


class Decoder:
    """Token-by-token decoding of a batch of streams that sit at the same phase.

    memory: the model's state after every token but the pending ones; pending (B,): the last
    token of each row, read by the next `step`. Each step reads the pending tokens, samples
    the next ones and makes them pending, so after any step `memory` and `pending` describe
    the stream up to its newest token exactly as `read_context` would. config: one for every
    row or one per row. A seeded row draws from a generator of its own, so its tokens depend
    on its own stream and seed only, not on the rows it shares a batch with.
    """

    def __init__(
        self,
        model: nn.Module,
        memory,
        pending: Tensor,
        config: SamplingConfig | list[SamplingConfig],
    ):
        self.model, self.memory, self.pending = model, memory, pending
        rows = pending.shape[0]
        self.configs = list(config) if isinstance(config, list) else [config] * rows
        self.generators = [
            None if c.seed is None else torch.Generator(device=pending.device).manual_seed(c.seed)
            for c in self.configs
        ]
        self.history: list[list[int]] = [[] for _ in range(rows)]
        self._group()

    def remember(self, rows_ids: list[list[int]]) -> None:
        """Ids (per row) the repetition penalty counts besides the generated ones."""
        for seen, ids in zip(self.history, rows_ids, strict=True):
            seen.extend(ids)

    def keep(self, rows: list[int]) -> None:
        """Go on with these rows only (the others finished)."""
        self.memory = None if self.memory is None else self.memory.index(rows)
        self.pending = self.pending[rows]
        self.configs = [self.configs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.history = [self.history[r] for r in rows]
        self._group()

    def _group(self) -> None:
        """Rows that sample alike (the same config but for the seed), with their config."""
        groups: dict[tuple, tuple[SamplingConfig, list[int]]] = {}
        for row, config in enumerate(self.configs):
            key = (config.replace(seed=None).to_json(), config.seed is None)
            groups.setdefault(key, (config, []))[1].append(row)
        self.sampling_groups = list(groups.values())

    @torch.no_grad()
    def step(self) -> Tensor:
        out = self.model(self.pending[:, None], memory=self.memory, logits_to_keep=1)
        logits = out.logits[:, -1]
        token = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for config, rows in self.sampling_groups:
            penalised = config.repetition_penalty != 1
            history = [self.history[r] for r in rows] if penalised else None
            generators = None if config.seed is None else [self.generators[r] for r in rows]
            token[rows] = sample_next(logits[rows], config, generators, history)
            if penalised:
                for r, t in zip(rows, token[rows].tolist(), strict=True):
                    self.history[r].append(t)
        self.memory, self.pending = out.memory, token
        return token


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_ids: Tensor | Iterable[int],
    max_new_tokens: int,
    memory=None,
    stop_ids: Iterable[int] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Greedy decoding (key/value cache inside the fold).

    prompt_ids (P,) or (B, P) with P >= 1 continue the stream in `memory` (e.g. a long context
    from `ingest`). Returns the generated ids (B, n), n <= max_new_tokens: decoding stops once
    every row has produced one of `stop_ids`; a row that stopped keeps its stop id and is
    padded with it afterwards.
    """
    prompt = _as_batch(prompt_ids, _device(model), "prompt_ids")
    if prompt.shape[1] < 1:
        raise ValueError("greedy_generate needs a prompt of at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=prompt.device)
    memory = ingest(model, prompt[:, :-1], memory, chunk_size)
    decoder = Decoder(model, memory, prompt[:, -1], SamplingConfig(temperature=0.0))
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    generated: list[Tensor] = []
    for _ in range(max_new_tokens):
        token = decoder.step()
        if generated:  # rows that already stopped repeat their stop id
            token = torch.where(done, generated[-1], token)
            decoder.pending = token
        generated.append(token)
        if stops.numel():
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
    return torch.stack(generated, dim=1)


# ---------------------------------------------------------------------------------------------
# Context states: a stream that can be continued, saved and loaded
# ---------------------------------------------------------------------------------------------


@dataclass
class ContextState:
    """One stream read so far: the model's state after every token but the last, and that
    last token, still to be read (its logits predict what comes next, so a saved context can
    be answered without re-reading anything). memory is None while at most one token was read.
    """

    memory: Any = None
    last_token: int | None = None
    tokens: int = 0

    def __post_init__(self) -> None:
        if (self.last_token is None) != (self.tokens == 0):
            raise ValueError(f"a context of {self.tokens} tokens has last_token {self.last_token}")


@torch.no_grad()
def read_context(
    model: nn.Module,
    token_ids: Iterable[int] | Tensor,
    context: ContextState | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    cuda_graph: bool = False,
    graphs: dict | None = None,
) -> ContextState:
    """Continue `context` (None: a fresh stream) with token_ids (T,); constant memory (the ids
    stay where they are; `ingest` moves one chunk at a time). cuda_graph, graphs: `ingest`'s."""
    context = context or ContextState()
    ids = _as_batch(token_ids, None, "token_ids").long()
    if ids.shape[0] != 1:
        raise ValueError(f"read_context reads one stream, got {ids.shape[0]} rows")
    if ids.shape[1] == 0:
        return context
    if context.last_token is not None:
        ids = torch.cat([ids.new_tensor([[context.last_token]]), ids], dim=1)
    memory = ingest(model, ids[:, :-1], context.memory, chunk_size, progress, cuda_graph, graphs)
    added = ids.shape[1] - (context.last_token is not None)
    return ContextState(memory, int(ids[0, -1]), context.tokens + added)


STATE_FORMAT = "foldformer-context-state"
STATE_VERSION = 1


class ContextStateError(ValueError):
    """A saved context state that cannot be used here (another model or tokenizer, or not a
    state file); the message says which."""


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model type, config and every weight's name, dtype, shape and bytes:
    equal exactly when two models compute the same thing (on any device)."""
    digest = hashlib.sha256()
    config = {"model_type": model.model_type, **model.config.to_dict()}
    for name in KERNEL_FIELDS:
        config.pop(name, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.fingerprint().encode()).hexdigest()


def state_to_bytes(context: ContextState, model_hash: str, tokenizer_hash: str, model) -> bytes:
    """A context as safetensors bytes: the state's tensors, and in the header's metadata one
    JSON entry (format, version, model_type, the two hashes, token count, last token)."""
    from safetensors.torch import save

    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model_type": model.model_type,
        "model_hash": model_hash,
        "tokenizer_hash": tokenizer_hash,
        "tokens": context.tokens,
        "last_token": context.last_token,
    }
    tensors = {} if context.memory is None else context.memory.to("cpu").state_dict()
    return save(tensors, metadata={STATE_FORMAT: json.dumps(meta)})


def state_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata of state bytes (the safetensors header: 8-byte length, then JSON)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = json.loads(header["__metadata__"][STATE_FORMAT])
    except (ValueError, KeyError, TypeError):
        raise ContextStateError("not a foldformer context state") from None
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise ContextStateError(
            f"context state format {meta.get('format')!r} version {meta.get('version')!r} is "
            f"not {STATE_FORMAT!r} version {STATE_VERSION}"
        )
    return meta


def state_from_bytes(
    data: bytes, model: nn.Module, model_hash: str, tokenizer_hash: str
) -> ContextState:
    """The context in `data`, refused unless it was saved for this model and tokenizer."""
    from safetensors.torch import load

    meta = state_metadata(data)
    if meta["model_type"] != model.model_type:
        raise ContextStateError(
            f"the context state is for a {meta['model_type']!r} model, this is a "
            f"{model.model_type!r} model"
        )
    for what, saved, here in (
        ("model (weights or config)", meta["model_hash"], model_hash),
        ("tokenizer", meta["tokenizer_hash"], tokenizer_hash),
    ):
        if saved != here:
            raise ContextStateError(
                f"the context state was saved with another {what}: hash {saved[:12]} != {here[:12]}"
            )
    tensors = load(data)
    memory = None
    if tensors:
        memory = model.state_class.from_state_dict(tensors).to(_device(model))
    return ContextState(memory, meta["last_token"], meta["tokens"])


# ---------------------------------------------------------------------------------------------
# Text in, text out: a model with its tokenizer
# ---------------------------------------------------------------------------------------------


class TextDecoder:
    """Generated ids -> text pieces as they become final: a cut multi-byte character and
    anything that may be the start of a stop string are held back until they are settled."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # given out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """The next id; returns the text that became final (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [text.find(s, max(0, len(self.text) - len(s))) for s in self.stop]
        hits = [at for at in hits if at >= 0]
        if hits:
            self.stopped = True
            return self._give(text[: min(hits)])
        text = text.rstrip("\ufffd")
        hold = [n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])]
        return self._give(text[: len(text) - max(hold, default=0)])

    def finish(self) -> str:
        """What is held back, once no more ids come."""
        return "" if self.stopped else self._give(self.tokenizer.decode(self.ids))

    def _give(self, final: str) -> str:
        piece = final[len(self.text) :]
        self.text += piece
        return piece


@dataclass
class Completion:
    """One finished generation: its text, why it ended ("stop": end of document or a stop
    string; "length": max_new_tokens; "cancelled": its caller said it was no longer wanted),
    the ids read and generated, and the context after it
    (the prompt and every generated id read) for a caller that keeps it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int]
    context: ContextState


class TextStream:
    """Iterator over the text pieces of one answer as they come, or (rows=True) over the
    (row, piece) pairs of a batch's answers; `.completions` is set once it is used up, and
    `.completion` is the first of them."""

    def __init__(self, runner: Iterator[tuple[int, str]], rows: bool = False):
        self._runner, self._rows = runner, rows
        self.completions: list[Completion] | None = None

    @property
    def completion(self) -> Completion | None:
        return self.completions and self.completions[0]

    def __iter__(self) -> TextStream:
        return self

    def __next__(self):
        try:
            row, piece = next(self._runner)
        except StopIteration as end:
            self.completions = end.value
            raise StopIteration from None
        return (row, piece) if self._rows else piece


class Engine:
    """A model and its tokenizer, for text: read contexts, generate, save and load states::

    engine = Engine.load("runs/x/final")
    book = engine.read(open("book.txt").read(), progress=True)
    for piece in engine.stream("Who did it?", book, SamplingConfig(seed=0)):
        print(piece, end="", flush=True)
    engine.save_state("book.state", book)
    """

    def __init__(
        self, model: nn.Module, tokenizer, chunk_size: int | None = None, cuda_graph: bool = False
    ):
        """cuda_graph: on a GPU, read contexts by replaying captured CUDA graphs of whole chunks
        of folds (`ingest`'s option; the same state, many times faster for a small model);
        captured once per batch size and kept, and used by one read at a time."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.chunk_size = chunk_size
        self.cuda_graph = cuda_graph
        self._graphs: dict = {}
        self._graph_lock = threading.Lock()  # a graph's buffers serve one stream at a time
        self.model_hash = model_fingerprint(model)
        self.tokenizer_hash = tokenizer_fingerprint(tokenizer)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str | torch.device = "cpu",
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> Engine:
        """A model directory (config.json, model.safetensors, tokenizer files), or a training
        run's folder (its `final` model is used). compile: torch.compile the whole-fold step, the hot
        path of ingestion, where the model has one (worth it on a GPU). cuda_graph: see
        `Engine`."""
        from foldformer.data.tokenizers import load_tokenizer
        from foldformer.models import load_model

        checkpoint = Path(checkpoint)
        if not (checkpoint / "config.json").is_file() and (checkpoint / "final").is_dir():
            checkpoint = checkpoint / "final"  # a training run's folder
        model = load_model(checkpoint, device=device)
        if compile:
            model.compile_fold()  # a no-op for a model without a segment step
        return cls(model, load_tokenizer(checkpoint), cuda_graph=cuda_graph)

    @property
    def device(self) -> torch.device:
        return _device(self.model)

    def read(
        self, text: str | list[int], context: ContextState | None = None, progress: bool = False
    ) -> ContextState:
        """Continue `context` (None: a fresh stream) with text (or token ids)."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else text
        chunk = self.chunk_size or default_chunk_size(self.model)
        n = ids.shape[-1] if isinstance(ids, Tensor) else len(ids)
        if not (self.cuda_graph and self.device.type == "cuda" and n > chunk):
            # (a read shorter than two chunks replays no graph: it takes no lock either)
            return read_context(self.model, ids, context, self.chunk_size, progress)
        with self._graph_lock:
            return read_context(self.model, ids, context, self.chunk_size, progress, True,
                                self._graphs)  # fmt: skip

    def state_bytes(self, context: ContextState) -> bytes:
        return state_to_bytes(context, self.model_hash, self.tokenizer_hash, self.model)

    def state_from_bytes(self, data: bytes) -> ContextState:
        return state_from_bytes(data, self.model, self.model_hash, self.tokenizer_hash)

    def save_state(self, path: str | Path, context: ContextState) -> None:
        """Write the context to `path` (safetensors with the JSON metadata in its header)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.state_bytes(context))
        os.replace(tmp, path)  # a state file is whole or absent

    def load_state(self, path: str | Path) -> ContextState:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"context state {str(path)!r} does not exist")
        try:
            return self.state_from_bytes(path.read_bytes())
        except ContextStateError as error:
            raise ContextStateError(f"{path}: {error}") from None

    def stream(
        self,
        prompt: str,
        context: ContextState | None = None,
        config: SamplingConfig | None = None,
    ) -> TextStream:
        """The text of one answer, piece by piece as it is produced."""
        return TextStream(self._generate([prompt], [context], [config or SamplingConfig()]))

    def stream_batch(
        self,
        prompts: list[str],
        contexts: list[ContextState | None] | None = None,
        config: SamplingConfig | list[SamplingConfig] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> TextStream:
        """Answers to many prompts, each continuing its own context (None: a fresh stream),
        with one sampling config for all or one per prompt, as (row, piece) pairs.
        cancelled(row), asked before every decode step: True ends that row there (finish
        reason "cancelled"; a server's client that went away) while the others go on."""
        contexts = contexts or [None] * len(prompts)
        if not isinstance(config, list):
            config = [config or SamplingConfig()] * len(prompts)
        for what, values in (("contexts", contexts), ("configs", config)):
            if len(values) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(values)} {what}")
        return TextStream(self._generate(prompts, contexts, config, cancelled), rows=True)

    def complete(
        self,
        prompts: list[str],
        contexts: list[ContextState | None] | None = None,
        config: SamplingConfig | list[SamplingConfig] | None = None,
    ) -> list[Completion]:
        """The finished answers of `stream_batch`."""
        stream = self.stream_batch(prompts, contexts, config)
        for _ in stream:
            pass
        return stream.completions

    def _generate(self, prompts, contexts, configs, cancelled=None):
        """Yields (row, text piece) as they come; returns the completions.

        Rows share a forward call only where their streams sit at the same phase
        (`stream_phase`): a recurrent state is tied to a place in its fold, and left padding
        would push pad tokens through the memory and change every later fold. So rows whose
        prompts end at one phase are decoded as one batch, which rows leave as they finish."""
        rows = []
        for prompt, context in zip(prompts, contexts, strict=True):
            context = context or ContextState()
            ids = self.tokenizer.encode(prompt)
            if context.tokens == 0 and not ids:  # nothing to continue: start a document
                ids = [self.tokenizer.eod_id]
            rows.append((context, ids))
        batches: dict[int, list[int]] = {}
        for i, (context, ids) in enumerate(rows):
            batches.setdefault(self.model.stream_phase(context.tokens + len(ids) - 1), []).append(i)
        results: list[Completion | None] = [None] * len(rows)
        for members in batches.values():
            done = yield from self._run_batch({i: rows[i] for i in members}, configs, cancelled)
            for i, completion in done.items():
                results[i] = completion
        return results

    def _concat(self, states: list, rows: list[int]):
        """One state of all the rows of `states`; None (a fresh stream) is the initial state."""
        if all(state is None for state in states):
            return None
        return self.model.state_class.concat(
            [
                self.model.initial_state(n) if s is None else s
                for s, n in zip(states, rows, strict=True)
            ]
        )

    @torch.no_grad()
    def _prefill(self, rows: dict, configs: list) -> tuple[Decoder, list[int]]:
        """Read the prompts of `rows` {index: (context, prompt ids)} in groups of one phase and
        one length (each group one forward call) into one decoder; and which row is which."""
        groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
        for i, (context, ids) in rows.items():
            unread = [] if context.last_token is None else [context.last_token]
            unread += ids  # the context's last token was not read yet
            key = (self.model.stream_phase(max(context.tokens - 1, 0)), len(unread))
            groups.setdefault(key, []).append((i, unread))
        order, states, pending = [], [], []
        for group in groups.values():
            ids = torch.tensor([unread for _, unread in group], device=self.device)
            memory = self._concat([rows[i][0].memory for i, _ in group], [1] * len(group))
            states.append(ingest(self.model, ids[:, :-1], memory, self.chunk_size))
            pending.append(ids[:, -1])
            order += [i for i, _ in group]
        decoder = Decoder(
            self.model,
            self._concat(states, [len(group) for group in groups.values()]),
            torch.cat(pending),
            [configs[i] for i in order],
        )
        decoder.remember([rows[i][1] for i in order])
        return decoder, order

    def _run_batch(self, rows: dict, configs: list, cancelled=None):
        """Decode `rows` {index: (context, prompt ids)} as one batch: yields (index, piece),
        returns {index: Completion}."""
        decoder, active = self._prefill(rows, configs)
        texts = {i: TextDecoder(self.tokenizer, configs[i].stop) for i in active}
        ends: dict[int, tuple[str, list[int]]] = {}  # why a row ended, and its ids
        finished: dict[int, Completion] = {}
        for new_tokens in itertools.count():
            going = []
            for pos, i in enumerate(active):  # rows that end here keep the decoder's state
                if i not in ends and new_tokens == configs[i].max_new_tokens:
                    ends[i] = ("length", texts[i].ids)
                if i not in ends and cancelled is not None and cancelled(i):
                    ends[i] = ("cancelled", texts[i].ids)
                if i not in ends:
                    going.append(pos)
                    continue
                piece = texts[i].finish()  # what was held back, unless a stop string cut it
                if piece:
                    yield i, piece
                memory = None if decoder.memory is None else decoder.memory.index([pos])
                context, ids = rows[i]
                state = ContextState(memory, int(decoder.pending[pos]),
                                     context.tokens + len(ids) + new_tokens)  # fmt: skip
                reason, token_ids = ends[i]
                finished[i] = Completion(texts[i].text, reason, len(ids), token_ids, state)
            if not going:
                return finished
            if len(going) < len(active):
                decoder.keep(going)
                active = [active[pos] for pos in going]
            for i, token in zip(active, decoder.step().tolist(), strict=True):
                if configs[i].stop_at_eod and token == self.tokenizer.eod_id:
                    ends[i] = ("stop", texts[i].ids + [token])  # read, but not text
                    continue
                piece = texts[i].push(token)
                if piece:
                    yield i, piece
                if texts[i].stopped:
                    ends[i] = ("stop", texts[i].ids)


__all__ = [
    "Completion",
    "ContextState",
    "ContextStateError",
    "Decoder",
    "Engine",
    "SamplingConfig",
    "TextStream",
    "default_chunk_size",
    "greedy_generate",
    "ingest",
    "model_fingerprint",
    "read_context",
    "sample_next",
    "score",
    "stream_losses",
]
