"""The segment driver: the loop over segments that every recurrent model of the project shares.

A model reads a stream in segments of ``segment_len`` tokens (w) and carries a state from one
segment to the next. The model does one segment; `StreamingLM.forward` owns the loop::

    state = memory or model.initial_state(B)
    for each segment S_k of the chunk (the first and last may be partial):
        reset the rows of reset_mask (on a segment boundary only)
        if S_k is a whole segment:  out, state = model.whole_segment(state, S_k)   # fused,
                                                                                   # checkpointed
        else:                        out, state = model.partial_segment(state, S_k)  # with cache
                                     if S_k completed the segment: state = model.condense(state)
        every `bptt` completed segments: state = state.detach()
    logits = model.logits(concat(outs))     # or the loss chunk by chunk (return_logits=False)

A stream that stops mid-segment keeps the partial segment (its cache) in the state and the next
call completes it, so chunk boundaries never change the result (DESIGN.md §3, invariant 1).
A model supplies `initial_state`, `whole_segment`, `partial_segment` and `condense`, and its
state class: a `StreamState`, a dataclass of tensors with their batch dimension declared.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from foldformer.config import DecoderConfig, read_model_config

S = TypeVar("S", bound="StreamState")


# ---------------------------------------------------------------------------------------------
# The state carried between segments and between calls
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """Base of every model's state: tensor fields (a field may be None, or a dict of named
    tensors), each with the dimension that holds the batch declared in ``BATCH_DIMS``.
    Subclasses say how many tokens of the current segment they hold (`tokens_in_segment`)."""

    BATCH_DIMS: ClassVar[dict[str, int]] = {}

    def tokens_in_segment(self) -> int:
        """p: tokens of the current, incomplete segment already read (same for every row)."""
        raise NotImplementedError

    def _map(self: S, fn) -> S:
        """fn(tensor, batch_dim) applied to every tensor; None stays None."""
        changes = {}
        for name, dim in self.BATCH_DIMS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                changes[name] = {k: fn(v, dim) for k, v in value.items()}
            else:
                changes[name] = None if value is None else fn(value, dim)
        return dataclasses.replace(self, **changes)

    def _tensors(self) -> dict[str, tuple[Tensor, int]]:
        """Every tensor by its state_dict name, with its batch dimension."""
        out = {}
        for name, dim in self.BATCH_DIMS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                out.update({f"{name}.{k}": (v, dim) for k, v in value.items()})
            elif value is not None:
                out[name] = (value, dim)
        return out

    @property
    def batch_size(self) -> int | None:
        """Rows of the state; None for a state holding no tensor yet (it fits any batch)."""
        return next((t.shape[dim] for t, dim in self._tensors().values()), None)

    def to(self: S, *args, **kwargs) -> S:
        """Move (and cast) the state; masks and token ids keep their dtype."""

        def move(t: Tensor, _dim: int) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            return t.to(device=torch.empty(0, device=t.device).to(*args, **kwargs).device)

        return self._map(move)

    def detach(self: S) -> S:
        return self._map(lambda t, _dim: t.detach())

    def index(self: S, rows: Tensor | slice | list[int]) -> S:
        """The state of the chosen batch rows."""
        return self._map(lambda t, dim: t[(slice(None),) * dim + (rows,)])

    def where(self: S, rows: Tensor, other: S) -> S:
        """Rows `rows` (B,) bool from `other`, the rest from self; fields `other` lacks stay."""

        def pick(t: Tensor, dim: int, name: str) -> Tensor:
            o = getattr(other, name)
            if o is None:
                return t
            shape = [1] * t.dim()
            shape[dim] = -1
            return torch.where(rows.view(shape), o.to(t.dtype), t)

        changes = {}
        for name, dim in self.BATCH_DIMS.items():
            value = getattr(self, name)
            changes[name] = None if value is None else pick(value, dim, name)
        return dataclasses.replace(self, **changes)

    @classmethod
    def concat(cls: type[S], states: list[S]) -> S:
        """One state of all the rows of `states` (e.g. the micro-batches of a step)."""
        parts = [s._tensors() for s in states]
        tensors = {k: torch.cat([p[k][0] for p in parts], dim=d) for k, (_, d) in parts[0].items()}
        return cls.from_state_dict(tensors)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors by name, e.g. for ``safetensors.torch.save_file``."""
        return {name: t.contiguous() for name, (t, _dim) in self._tensors().items()}

    @classmethod
    def from_state_dict(cls: type[S], tensors: dict[str, Tensor]) -> S:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default_factory is dict:  # a dict field: its tensors are named "field.key"
                prefix = f"{f.name}."
                values[f.name] = {
                    k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
                }
            else:
                values[f.name] = tensors.get(f.name)
        return cls(**values)


@dataclass
class FoldedOutput:
    """What every model returns: logits (B, T, V), or (B, logits_to_keep, V), or None (loss
    computed chunk by chunk); the state to pass back as `memory=`; the loss given labels."""

    logits: Tensor | None
    memory: StreamState
    loss: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# The models: one segment each; the loop, checks and outputs here
# ---------------------------------------------------------------------------------------------


class StreamingLM(nn.Module):
    """Base of every model: the segment driver (`forward`), one-token steps, parameter counts
    and the save/load format. Subclasses set the three class attributes and supply the
    per-segment methods below."""

    model_type: ClassVar[str] = ""  # written into config.json
    config_class: ClassVar[type] = DecoderConfig
    state_class: ClassVar[type[StreamState]] = StreamState  # what `.memory` holds

    def __init__(self, config) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got "
                f"{type(config).__name__}"
            )
        self.config = config

    # -- what a model supplies ---------------------------------------------------------------

    def initial_state(self, batch_size: int) -> StreamState:
        """The state of a fresh stream (and of a row after a reset)."""
        raise NotImplementedError

    def inputs(self, input_ids: Tensor) -> Tensor:
        """What the steps read, (B, T, ...): token ids here, embeddings in the in-house models."""
        return input_ids

    def chunk_context(self, x: Tensor, state: StreamState) -> Any:
        """What every step of one call shares (e.g. rotary tables), computed once a call."""
        return None

    def whole_segment(self, state: StreamState, x: Tensor, context: Any) -> tuple[Tensor, Any]:
        """A whole segment (w tokens) from a segment boundary, in one pass: its outputs and the
        condensed state the next segment starts from."""
        raise NotImplementedError

    def partial_segment(self, state: StreamState, x: Tensor, context: Any) -> tuple[Tensor, Any]:
        """The next x.shape[1] tokens of the current segment (not past its end), read with the
        state's cache: their outputs and the state holding the segment so far."""
        raise NotImplementedError

    def condense(self, state: StreamState) -> StreamState:
        """The state after a segment completed by `partial_segment` -> the next segment's."""
        raise NotImplementedError

    # A pure function of tensors for one whole segment (the hot path of training and prefill),
    # which `whole_segment` calls through `fold_step`; a model that has one can compile it.
    complete_fold = None

    @property
    def fold_step(self):
        """`complete_fold`, compiled once `compile_fold` ran."""
        return self.__dict__.get("_fold_step") or self.complete_fold

    def compile_fold(self, **compile_options) -> bool:
        """torch.compile the whole-segment step: one segment has fixed shapes, so it compiles
        once, and the loop over segments stays in Python. False (nothing done) for a model
        without a `complete_fold`. The compiled step is bound to this model: a deep copy would
        share it, and the model no longer pickles (save with `save_pretrained`)."""
        if self.complete_fold is None:
            return False
        # The first segment of a call sees a memory that requires grad (M0, a previous
        # segment) or not (carried and detached): a few graph variants, more than dynamo's
        # default budget.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._fold_step = torch.compile(self.complete_fold, **compile_options)
        return True

    def stream_phase(self, position: int) -> int:
        """Streams whose states hold tokens up to equal phases may share a batch: the next
        token's computation depends on the position only through the phase. Here the position
        itself, right for any model; a model whose segments do not see their absolute
        position says less."""
        return position

    def reset_rows(self, state: StreamState, rows: Tensor) -> StreamState:
        """Restart rows (B,) bool from the initial state (called on a segment boundary)."""
        return state.where(rows, self.initial_state(rows.shape[0]))

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits of the steps' outputs (here the outputs are logits already)."""
        return hidden

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Token embeddings and an untied head (left out of non-embedding counts)."""
        raise NotImplementedError

    # -- the driver --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        memory: StreamState | None = None,
        labels: Tensor | None = None,
        reset_mask: Tensor | None = None,
        bptt: int = 0,
        checkpoint: bool = False,
        logits_to_keep: int = 0,
        return_logits: bool = True,
    ) -> FoldedOutput:
        """Read a chunk of the stream.

        input_ids: (B, T) token ids, any T >= 1.
        memory: the state returned by the previous call, or None for fresh streams.
        labels: (B, T) targets aligned with input_ids (the token that should follow each
            position); -100 is ignored. The returned loss is their mean cross-entropy.
        reset_mask: (B,) bool, restart these rows from the initial state before reading
            (document boundary); or (B, T) bool, restart a row before token t. Resets must
            fall on fold (segment) boundaries: anywhere else is an error.
        bptt: detach the state every `bptt` completed segments (0: backpropagate through all).
        checkpoint: recompute each whole segment in backward; only the states are kept.
        logits_to_keep: if > 0, compute logits for the last that many positions only.
        return_logits: False (with labels) computes the loss chunk by chunk, recomputing each
            chunk's logits in backward, so (B, T, V) logits never exist at once; .logits is None.
        """
        self.check_inputs(input_ids, memory, labels, reset_mask)
        B, T = input_ids.shape
        state = memory if memory is not None else self.initial_state(B)
        x = self.inputs(input_ids)
        hidden, state = self.read(x, state, expand_reset_mask(reset_mask, T), bptt, checkpoint)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
            labels = None if labels is None else labels[:, -logits_to_keep:]
        if not return_logits and labels is not None:
            return FoldedOutput(logits=None, memory=state, loss=self.chunked_loss(hidden, labels))
        logits = self.logits(hidden)
        loss = None if labels is None else language_model_loss(logits, labels)
        return FoldedOutput(logits=logits, memory=state, loss=loss)

    def read(
        self, x: Tensor, state: StreamState, resets: Tensor | None, bptt: int, checkpoint: bool
    ) -> tuple[Tensor, StreamState]:
        """The loop over segments: the outputs of every position of x and the final state."""
        w, T = self.config.segment_len, x.shape[1]
        check_reset_columns(resets, state.tokens_in_segment(), w)
        resets_at = reset_columns(resets)
        context = self.chunk_context(x, state)
        outputs, t, completed = [], 0, 0
        while t < T:
            if t in resets_at:
                state = self.reset_rows(state, resets[:, t])
            p = state.tokens_in_segment()
            n = min(w - p, T - t)
            segment = x[:, t : t + n]
            if p == 0 and n == w:  # the common case: a whole segment in one fused pass
                if checkpoint and torch.is_grad_enabled():
                    out, state = activation_checkpoint(
                        self.whole_segment, state, segment, context, use_reentrant=False
                    )
                else:
                    out, state = self.whole_segment(state, segment, context)
            else:
                out, state = self.partial_segment(state, segment, context)
                if p + n == w:
                    state = self.condense(state)
            outputs.append(out)
            t += n
            if p + n == w:
                completed += 1
                if bptt and completed % bptt == 0:
                    state = state.detach()
        return torch.cat(outputs, dim=1), state

    def chunked_loss(self, hidden: Tensor, labels: Tensor, max_elements: int = 2**27) -> Tensor:
        """Mean cross-entropy of logits(hidden) without holding all logits: each chunk of
        positions is checkpointed, so only one chunk's logits live at a time."""

        def chunk_loss_sum(h: Tensor, y: Tensor) -> Tensor:
            logits = self.logits(h)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                reduction="sum",
            )  # fmt: skip

        B, T, _ = hidden.shape
        step = max(1, max_elements // (B * self.config.vocab_size))
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start in range(0, T, step):
            h, y = hidden[:, start : start + step], labels[:, start : start + step]
            if torch.is_grad_enabled():
                total = total + activation_checkpoint(chunk_loss_sum, h, y, use_reentrant=False)
            else:
                total = total + chunk_loss_sum(h, y)
        return total / (labels != -100).sum().clamp(min=1)

    # -- the rest of the protocol -------------------------------------------------------------

    @torch.no_grad()
    def step(self, token_ids: Tensor, memory: StreamState | None = None) -> FoldedOutput:
        """Read one token per row (B,), continuing `memory` (inside a segment: with its cache);
        returns logits (B, V) for the next token. The path generation uses."""
        if token_ids.dim() != 1:
            raise ValueError(f"step takes token ids of shape (B,), got {tuple(token_ids.shape)}")
        out = self.forward(token_ids[:, None], memory)
        return FoldedOutput(logits=out.logits[:, -1], memory=out.memory)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops `embedding_parameters()`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embedding_parameters())
        return n

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (with model_type) and model.safetensors into directory."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(
            json.dumps({"model_type": self.model_type, **self.config.to_dict()}, indent=2) + "\n"
        )
        save_model(self, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """Load a model written by save_pretrained (safetensors only, nothing unpickled)."""
        from safetensors.torch import load_model

        directory = Path(directory)
        found, values = read_model_config(directory)
        if found != cls.model_type:
            raise ValueError(f"{directory} holds a {found!r} model, not a {cls.model_type!r} one")
        model = cls(cls.config_class.from_dict(values))
        load_model(model, str(directory / "model.safetensors"), device=str(device))
        return model.to(device)

    # -- checks ------------------------------------------------------------------------------

    def check_inputs(
        self,
        input_ids: Tensor,
        memory: StreamState | None,
        labels: Tensor | None,
        reset_mask: Tensor | None,
    ) -> None:
        """Every bad input as one ValueError/TypeError naming the offending value."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}"
            )
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        low, high, vocab_size = int(input_ids.min()), int(input_ids.max()), self.config.vocab_size
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token id {low if low < 0 else high} is out of range for vocab_size={vocab_size}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        if reset_mask is not None and (
            not isinstance(reset_mask, Tensor)
            or reset_mask.dtype != torch.bool
            or reset_mask.shape not in ((B,), (B, T))
        ):
            got = (
                f"{reset_mask.dtype} {tuple(reset_mask.shape)}"
                if isinstance(reset_mask, Tensor)
                else type(reset_mask).__name__
            )
            raise ValueError(
                f"reset_mask must be a bool tensor of shape ({B},) or ({B}, {T}), got {got}"
            )
        if memory is not None:
            self.check_state(memory, B)

    def check_state(self, memory: Any, batch_size: int) -> None:
        """The state is this model's, and its fixed-size tensors have a fresh state's shapes."""
        if not isinstance(memory, self.state_class):
            raise TypeError(
                f"memory must be the {self.state_class.__name__} returned by the model, got "
                f"{type(memory).__name__}"
            )
        fresh = self.initial_state(batch_size)._tensors()
        for name, (tensor, _dim) in memory._tensors().items():
            if name in fresh and tensor.shape != fresh[name][0].shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(fresh[name][0].shape)} for batch size {batch_size}"
                )
        if memory.batch_size not in (None, batch_size):
            raise ValueError(
                f"memory holds {memory.batch_size} rows but input_ids has batch size {batch_size}"
            )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def expand_reset_mask(reset_mask: Tensor | None, T: int) -> Tensor | None:
    """(B,) -> (B, T) with the resets before token 0; (B, T) unchanged."""
    if reset_mask is not None and reset_mask.dim() == 1:
        return F.pad(reset_mask[:, None], (0, T - 1))
    return reset_mask


def reset_columns(resets: Tensor | None) -> set[int]:
    """Positions t where some row of a (B, T) reset mask restarts. Read once per call: asking
    `resets[:, t].any()` segment by segment would make the GPU wait for the host every time."""
    if resets is None:
        return set()
    return set(resets.any(dim=0).nonzero()[:, 0].tolist())


def check_reset_columns(resets: Tensor | None, tokens_in_segment: int, segment_len: int) -> None:
    """Resets fall on fold (segment) boundaries: one rule, one message, for every model."""
    misplaced = sorted(c for c in reset_columns(resets) if (tokens_in_segment + c) % segment_len)
    if misplaced:
        first = (segment_len - tokens_in_segment) % segment_len
        raise ValueError(
            f"reset_mask resets rows only on a fold boundary, but token {misplaced[0]} of this "
            f"chunk is not on one: folds are {segment_len} tokens and the state holds "
            f"{tokens_in_segment} of the current one, so resets may fall at tokens {first}, "
            f"{first} + {segment_len}, ..."
        )


def language_model_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose label is not -100 (0 if there are none)."""
    losses = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return losses / (labels != -100).sum().clamp(min=1)
