"""Training batches: the batch-source protocol, and stateful text streams.

Every batch source (text streams, synthetic tasks, BABILong) follows one protocol::

    batch = source.next_batch()        # Batch(input_ids, labels, reset_mask), each (B, T)
    state = source.state_dict()        # plain ints/lists/strings: JSON-serialisable
    source.load_state_dict(state)      # the next batch is exactly the one that would have come

labels are already shifted (labels[:, t] is the target for position t) with -100 where there
is nothing to predict; reset_mask[b, t] restarts row b's memory from M0 before token t. T is a
multiple of the model's segment length, so resets always fall on fold boundaries.

`TextStreams` makes each batch row one continuous stream of documents, continued exactly by
the next batch (Transformer-XL style: the trainer carries the model memory across batches).
A folded model can only reset a row's memory between folds, so after each document's
end-of-document token the row is padded (with eod, label -100) up to the next multiple of the
segment length, and the next document starts on a fold boundary with reset_mask set::

    segment_len = 4   |  fold 1       |  fold 2         |  fold 3        |
    input_ids         |  a0 a1 a2 a3  |  a4 eod pad pad |  b0 b1 b2 eod  |
    labels            |  a1 a2 a3 a4  |  eod -  -   -   |  b1 b2 eod -   |
    reset_mask        |  T  .  .  .   |  .  .  .   .    |  T  .  .  .    |

(- is -100; pad is the eod id.) seq_len is a multiple of segment_len, so every batch also
begins on a fold boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from foldformer.data.cache import TokenCorpus

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One training batch; all tensors (B, T)."""

    input_ids: Tensor  # long
    labels: Tensor  # long, already shifted, -100 ignored
    reset_mask: Tensor  # bool, restart the row's memory before this token
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the curriculum level it was made at

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.reset_mask.to(device, non_blocking=non_blocking),
            dict(self.meta),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer needs from a data source."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


class TextStreams:
    """Batches of continuous document streams from a tokenized corpus.

    corpus: a TokenCorpus (see `tokenize_corpus`).
    batch_size: rows per batch on this rank (B). The global batch has world_size * B rows;
        rank r serves global rows r*B … (r+1)*B−1, so the ranks' rows together are exactly
        the rows one process would produce with batch_size = world_size * B.
    seq_len: tokens per row per batch (T), a multiple of segment_len.
    segment_len: the model's fold length w; documents start on multiples of it.
    seed: documents are shuffled per row and per epoch from (seed, row, epoch); each row's
        first document starts at a random offset so rows do not repeat one another.
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        batch_size: int,
        seq_len: int,
        segment_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("seq_len", seq_len),
            ("segment_len", segment_len),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if seq_len % segment_len:
            raise ValueError(
                f"seq_len={seq_len} must be a multiple of segment_len={segment_len}: documents "
                "start on fold boundaries, where the model can reset its memory"
            )
        check_rank(rank, world_size)
        if len(corpus) == 0:
            raise ValueError("the corpus holds no documents")
        self.corpus = corpus
        self.batch_size, self.seq_len, self.segment_len = batch_size, seq_len, segment_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows = list(range(rank * batch_size, (rank + 1) * batch_size))  # global row ids
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # row -> (epoch, permutation)
        self.reset()

    # -- per-row stream ---------------------------------------------------------------------

    def _order(self, row: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(row)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, row, epoch])
            cached = (epoch, rng.permutation(len(self.corpus)))
            self._orders[row] = cached
        return cached[1]

    def reset(self) -> None:
        """Back to the very first batch."""
        # Row state: [epoch, index into the epoch's document order, position in the current
        # document unit, token offset at which that unit began in its document]. Only a row's
        # first unit begins inside its document (a random offset); all others begin at 0.
        self._state = []
        for row in self.rows:
            doc = int(self._order(row, 0)[0])
            length = int(self.corpus.doc_ends[doc] - self.corpus.doc_starts[doc])
            rng = np.random.default_rng([self.seed, row, 2**31])
            self._state.append([0, 0, 0, int(rng.integers(0, max(length - 1, 1)))])
        self.batches = 0

    def _fill_row(
        self, row_index: int, ids: np.ndarray, labels: np.ndarray, reset: np.ndarray
    ) -> None:
        """Write the next seq_len positions of one row and advance its state."""
        row = self.rows[row_index]
        epoch, index, pos, first = self._state[row_index]
        corpus, w, T = self.corpus, self.segment_len, self.seq_len
        t = 0
        while t < T:
            doc = int(self._order(row, epoch)[index])
            start, end = int(corpus.doc_starts[doc]) + first, int(corpus.doc_ends[doc])
            n_real = end - start  # tokens of this unit, eod included
            unit = -(-n_real // w) * w  # padded to a whole number of folds
            if pos == 0:
                reset[t] = True  # a document starts here, on a fold boundary
            take = min(T - t, unit - pos)
            real = max(0, min(take, n_real - pos))
            if real:
                a = start + pos
                tokens = corpus.tokens[a : min(a + real + 1, end)].astype(np.int64)
                ids[t : t + real] = tokens[:real]
                # Target: the next token of the same document; the eod position has none.
                labels[t : t + real] = IGNORE_INDEX
                labels[t : t + len(tokens) - 1] = tokens[1:]
            ids[t + real : t + take] = corpus.eod_id  # padding up to the fold boundary
            labels[t + real : t + take] = IGNORE_INDEX
            t, pos = t + take, pos + take
            if pos == unit:  # next document
                pos, first, index = 0, 0, index + 1
                if index == len(corpus):
                    epoch, index = epoch + 1, 0
        self._state[row_index] = [epoch, index, pos, first]

    # -- protocol ---------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        B, T = self.batch_size, self.seq_len
        ids = np.empty((B, T), dtype=np.int64)
        labels = np.empty((B, T), dtype=np.int64)
        reset = np.zeros((B, T), dtype=bool)
        for r in range(B):
            self._fill_row(r, ids[r], labels[r], reset[r])
        self.batches += 1
        return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(reset))

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": "text_streams",
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "segment_len": self.segment_len,
            "n_documents": len(self.corpus),
            "batches": self.batches,
            "rows": [list(map(int, s)) for s in self._state],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "rank", "world_size", "batch_size", "segment_len", "n_documents"):
            mine = len(self.corpus) if key == "n_documents" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume text streams: saved {key}={state.get(key)!r} but this run has "
                    f"{key}={mine!r}"
                )
        self.batches = int(state["batches"])
        self._state = [list(map(int, s)) for s in state["rows"]]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len
