"""Adapters that put published PyPI implementations behind the project protocol.

Each adapter wraps the peer's own module (nothing re-implemented) and feeds it the stream
segment by segment (``segment_len`` tokens, the peer's training length), carrying the peer's
recurrent state between segments and between calls. Install them with
``pip install 'foldformer[peers]'``.

| model_type             | package                                | state carried between segments          |
| ---------------------- | -------------------------------------- | --------------------------------------- |
| `peer_rmt`             | recurrent-memory-transformer-pytorch   | memory tokens (+ XL memories, detached) |
| `peer_infini`          | infini-transformer-pytorch             | compressive memory per layer and head    |
| `peer_xl`              | x-transformers (`max_mem_len`)         | per-layer XL memories, detached          |
| `peer_block_recurrent` | block-recurrent-transformer-pytorch    | state vectors + XL memories, detached    |

A stream that stops mid-segment keeps the tokens of the partial segment; the next call runs the
peer again over the whole partial segment with the same state (a recomputation, so chunking does
not change the logits, at the cost of re-reading up to w − 1 tokens) and the state advances only
when a segment completes (a segment completed that way is read once more for the new state). Where a peer differs from the project protocol is said in
docs/baselines.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from foldformer.config import ConfigError, DecoderConfig
from foldformer.streaming import StreamingLM, StreamState


class PeerUnavailableError(ImportError):
    """A peer's PyPI package is not installed; the message says how to install it."""


def require_peer(module: str, package: str, model_type: str):
    """Import a peer's module or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PeerUnavailableError(
            f"model_type {model_type!r} wraps the PyPI package {package!r}, which is not "
            f"installed ({error}). Install the peers with: pip install 'foldformer[peers]' "
            f"(or only this one: pip install {package})"
        ) from error


# ---------------------------------------------------------------------------------------------
# Config and state
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerConfig(DecoderConfig):
    """The shape fields every adapter shares, named as in FoldedConfig.

    d_ff sets the peer's ``ff_mult = d_ff / d_model``; the peer decides its own inner width
    from it (GEGLU peers use 2/3 of it), so parameter matching adjusts d_ff, not a formula.
    memory_len is the peer's memory size where it has one (see each adapter).
    """

    # memory_len bounds per adapter: (minimum, maximum or None, why)
    MEMORY_LEN_RANGE: ClassVar[tuple[int, int | None, str]] = (0, None, "")

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high, why = self.MEMORY_LEN_RANGE
        if self.memory_len < low or (high is not None and self.memory_len > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(
                f"{type(self).__name__}: memory_len must be {bound} ({why}), got {self.memory_len}"
            )

    @property
    def ff_mult(self) -> float:
        return self.d_ff / self.d_model


@dataclass
class PeerState(StreamState):
    """state: the peer's recurrent state, flattened to named tensors with the batch first
    (empty for a fresh stream). pending: (B, p) tokens of the current, incomplete segment."""

    state: dict[str, Tensor] = field(default_factory=dict)
    pending: Tensor | None = None

    BATCH_DIMS: ClassVar[dict[str, int]] = {"state": 0, "pending": 0}

    def tokens_in_segment(self) -> int:
        return 0 if self.pending is None else self.pending.shape[1]


def _stacked(prefix: str, tensors: list[Tensor], batch_dim: int) -> dict[str, Tensor]:
    return {f"{prefix}{i}": t.movedim(batch_dim, 0) for i, t in enumerate(tensors)}


def _unstacked(prefix: str, tensors: dict[str, Tensor], batch_dim: int) -> list[Tensor]:
    n = sum(1 for k in tensors if k.startswith(prefix) and k[len(prefix) :].isdigit())
    return [tensors[f"{prefix}{i}"].movedim(0, batch_dim) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The adapter: one segment of the peer's module per step of the segment driver
# ---------------------------------------------------------------------------------------------


class PeerModel(StreamingLM):
    """Base adapter. Subclasses build ``self.net`` and implement `run_segment` and
    `embedding_parameters`.

    The driver detaches the state every `bptt` segments, as for every model; that matters only
    where the peer keeps a graph across segments (peer_rmt's memory tokens, peer_infini's
    memory), the other peers detach their state themselves. A reset of every row starts fresh streams; a reset of some rows zeroes
    their state, which is the peer's fresh state only where the peer starts from zeros (docs).
    """

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type[PeerConfig]] = PeerConfig
    state_class: ClassVar[type[PeerState]] = PeerState
    package: ClassVar[str] = ""

    def run_segment(
        self, tokens: Tensor, state: dict[str, Tensor], complete: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits (B, n, V) for tokens (B, n <= w), the first n tokens of a segment, read
        with `state` ({} for a fresh stream); and, if `complete`, the state after it."""
        raise NotImplementedError

    # -- one segment: what the segment driver calls --------------------------------------------

    def initial_state(self, batch_size: int) -> PeerState:
        return PeerState()

    def whole_segment(self, state, tokens, context):
        logits, new = self.run_segment(tokens, state.state, True)
        return logits, PeerState(new)

    def partial_segment(self, state, tokens, context):
        """The peer runs again over the whole partial segment, with the same state."""
        p = state.tokens_in_segment()
        if p:
            tokens = torch.cat([state.pending, tokens], dim=1)
        logits, _ = self.run_segment(tokens, state.state, False)
        return logits[:, p:], PeerState(state.state, tokens)

    def condense(self, state: PeerState) -> PeerState:
        """The completed segment read once more, for the peer's state after it."""
        return PeerState(self.run_segment(state.pending, state.state, True)[1])

    def reset_rows(self, state: PeerState, rows: Tensor) -> PeerState:
        if bool(rows.all()) or not state.state:
            return PeerState()
        keep = ~rows
        return PeerState(
            {k: v * keep.view(-1, *[1] * (v.dim() - 1)).to(v.dtype) for k, v in state.state.items()}
        )


# ---------------------------------------------------------------------------------------------
# recurrent-memory-transformer-pytorch
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerRMTConfig(PeerConfig):
    """memory_len: memory tokens (>= 1). use_xl_memories: the package's default, which adds
    XL memories of the previous segment to every layer."""

    memory_len: int = 8
    use_xl_memories: bool = True

    MEMORY_LEN_RANGE: ClassVar[tuple[int, int | None, str]] = (1, None, "RMT needs memory tokens")


class PeerRMT(PeerModel):
    """lucidrains' RecurrentMemoryTransformer, one segment per call of the module."""

    model_type: ClassVar[str] = "peer_rmt"
    config_class: ClassVar[type[PeerConfig]] = PeerRMTConfig
    package: ClassVar[str] = "recurrent-memory-transformer-pytorch"

    def __init__(self, config: PeerRMTConfig):
        super().__init__(config)
        lib = require_peer("recurrent_memory_transformer_pytorch", self.package, self.model_type)
        # hyper-connections picks a residual stream with Python's `random`: seed it from
        # torch's generator so torch.manual_seed makes the initialisation reproducible.
        python_random = random.getstate()
        random.seed(int(torch.randint(0, 2**62, (1,), device="cpu")))
        try:
            self.net = self._build(lib, config)
        finally:
            random.setstate(python_random)

    @staticmethod
    def _build(lib, config: PeerRMTConfig) -> nn.Module:
        return lib.RecurrentMemoryTransformer(
            config.d_model,
            num_tokens=config.vocab_size,
            depth=config.n_layers,
            num_memory_tokens=config.memory_len,
            seq_len=config.segment_len,
            dim_head=config.head_dim,
            heads=config.n_heads,
            ff_mult=config.ff_mult,
            attn_dropout=config.dropout,
            ff_dropout=config.dropout,
            use_xl_memories=config.use_xl_memories,
        )

    def run_segment(self, tokens, state, complete):
        memories = state.get("memory")
        xl = _unstacked("xl", state, batch_dim=1) or None
        logits, memories, xl = self.net(tokens, memories, xl_memories=xl)
        if not complete:
            return logits, {}
        new = {"memory": memories}
        if xl:
            new.update(_stacked("xl", xl, batch_dim=1))  # (2, B, heads, n, hd) per layer
        return logits, new

    def embedding_parameters(self):
        params = [self.net.token_emb.weight, *self.net.to_logits.parameters()]
        if self.net.pos_emb is not None:
            params.append(self.net.pos_emb.weight)
        return params


# ---------------------------------------------------------------------------------------------
# infini-transformer-pytorch
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerInfiniConfig(PeerConfig):
    """memory_len must be 0: Infini-attention's memory is a head_dim × head_dim matrix (and a
    normaliser) per head and layer, whatever the length. use_mem_delta_rule: the paper's delta
    update (off by default in the package)."""

    memory_len: int = 0
    use_mem_delta_rule: bool = False

    MEMORY_LEN_RANGE: ClassVar[tuple[int, int | None, str]] = (
        0,
        0,
        "the compressive memory has a fixed size set by head_dim",
    )


class PeerInfini(PeerModel):
    """lucidrains' InfiniTransformer: local causal attention within a segment plus linear
    attention to a compressive memory of all earlier segments."""

    model_type: ClassVar[str] = "peer_infini"
    config_class: ClassVar[type[PeerConfig]] = PeerInfiniConfig
    package: ClassVar[str] = "infini-transformer-pytorch"

    def __init__(self, config: PeerInfiniConfig):
        super().__init__(config)
        lib = require_peer("infini_transformer_pytorch", self.package, self.model_type)
        self.net = lib.InfiniTransformer(
            num_tokens=config.vocab_size,
            dim=config.d_model,
            depth=config.n_layers,
            dim_head=config.head_dim,
            heads=config.n_heads,
            attn_dropout=config.dropout,
            ff_mult=config.ff_mult,
            ff_dropout=config.dropout,
            use_mem_delta_rule=config.use_mem_delta_rule,
        )
        self._memories = lib.infini_transformer.Memories

    def run_segment(self, tokens, state, complete):
        kv, norms = _unstacked("kv", state, 0), _unstacked("norm", state, 0)
        past = [self._memories(a, b) for a, b in zip(kv, norms, strict=True)] or None
        out = self.net(tokens, past_memories=past, return_new_memories=complete)
        if not complete:
            return out.logits, {}
        new = _stacked("kv", [m.kv_mem for m in out.past_memories], 0)
        new.update(_stacked("norm", [m.k_norm for m in out.past_memories], 0))
        return out.logits, new

    def embedding_parameters(self):
        return [self.net.token_emb.weight, *self.net.to_logits.parameters()]


# ---------------------------------------------------------------------------------------------
# x-transformers, Transformer-XL recurrence
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerXLConfig(PeerConfig):
    """memory_len: the XL memory (``max_mem_len``) per layer, >= 1. Positions are rotary."""

    memory_len: int = 8

    MEMORY_LEN_RANGE: ClassVar[tuple[int, int | None, str]] = (1, None, "XL needs memories")


class PeerXL(PeerModel):
    """x-transformers' TransformerWrapper with ``max_mem_len``: XL recurrence, memories
    detached by the package."""

    model_type: ClassVar[str] = "peer_xl"
    config_class: ClassVar[type[PeerConfig]] = PeerXLConfig
    package: ClassVar[str] = "x-transformers"

    def __init__(self, config: PeerXLConfig):
        super().__init__(config)
        lib = require_peer("x_transformers", self.package, self.model_type)
        self.net = lib.TransformerWrapper(
            num_tokens=config.vocab_size,
            max_seq_len=config.segment_len,
            max_mem_len=config.memory_len,
            emb_dropout=config.dropout,
            attn_layers=lib.Decoder(
                dim=config.d_model,
                depth=config.n_layers,
                heads=config.n_heads,
                attn_dim_head=config.head_dim,
                ff_mult=config.ff_mult,
                attn_dropout=config.dropout,
                ff_dropout=config.dropout,
                rotary_pos_emb=True,
            ),
        )

    def run_segment(self, tokens, state, complete):
        mems = _unstacked("mem", state, 0) or None
        if not complete:
            return self.net(tokens, mems=mems), {}
        logits, mems = self.net(tokens, mems=mems, return_mems=True)
        return logits, _stacked("mem", mems, 0)

    def embedding_parameters(self):
        params = [*self.net.token_emb.parameters(), *self.net.to_logits.parameters()]
        pos = getattr(self.net, "pos_emb", None)  # a module only when absolute positions are on
        return params + (list(pos.parameters()) if isinstance(pos, nn.Module) else [])


# ---------------------------------------------------------------------------------------------
# block-recurrent-transformer-pytorch
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerBlockRecurrentConfig(PeerConfig):
    """segment_len is the block width; memory_len the number of recurrent state vectors."""

    memory_len: int = 8

    MEMORY_LEN_RANGE: ClassVar[tuple[int, int | None, str]] = (
        1,
        None,
        "the recurrent layer needs state vectors",
    )


class PeerBlockRecurrent(PeerModel):
    """lucidrains' BlockRecurrentTransformer (Hutchins et al. 2022): a recurrent layer in the
    middle of the stack with state vectors, plus XL memories; the package detaches both."""

    model_type: ClassVar[str] = "peer_block_recurrent"
    config_class: ClassVar[type[PeerConfig]] = PeerBlockRecurrentConfig
    package: ClassVar[str] = "block-recurrent-transformer-pytorch"

    def __init__(self, config: PeerBlockRecurrentConfig):
        super().__init__(config)
        lib = require_peer("block_recurrent_transformer_pytorch", self.package, self.model_type)
        self.net = lib.BlockRecurrentTransformer(
            num_tokens=config.vocab_size,
            dim=config.d_model,
            depth=config.n_layers,
            dim_head=config.head_dim,
            heads=config.n_heads,
            ff_mult=config.ff_mult,
            max_seq_len=config.segment_len,
            block_width=config.segment_len,
            num_state_vectors=config.memory_len,
        )

    def run_segment(self, tokens, state, complete):
        mems, states = _unstacked("xl", state, 1), _unstacked("state", state, 0)
        logits, mems, states = self.net(
            tokens, xl_memories=mems, states=states, return_memories_and_states=complete
        )
        if not complete:
            return logits, {}
        new = _stacked("xl", mems, 1)  # (2, B, n, head_dim) per layer
        new.update(_stacked("state", states, 0))
        return logits, new

    def embedding_parameters(self):
        return [self.net.token_emb.weight, *self.net.to_logits[-1].parameters()]


PEERS: dict[str, type[PeerModel]] = {
    cls.model_type: cls for cls in (PeerRMT, PeerInfini, PeerXL, PeerBlockRecurrent)
}


def peer_available(model_type: str) -> bool:
    """Whether the PyPI package behind a peer adapter is installed."""
    module = {
        "peer_rmt": "recurrent_memory_transformer_pytorch",
        "peer_infini": "infini_transformer_pytorch",
        "peer_xl": "x_transformers",
        "peer_block_recurrent": "block_recurrent_transformer_pytorch",
    }[model_type]
    return importlib.util.find_spec(module) is not None


__all__ = [
    "PEERS",
    "PeerBlockRecurrent",
    "PeerBlockRecurrentConfig",
    "PeerConfig",
    "PeerInfini",
    "PeerInfiniConfig",
    "PeerModel",
    "PeerRMT",
    "PeerRMTConfig",
    "PeerState",
    "PeerUnavailableError",
    "PeerXL",
    "PeerXLConfig",
    "peer_available",
    "require_peer",
]
