"""Synthetic retrieval tasks, generated on the fly from a seed, with a curriculum over folds.

Each task is a batch source (see `foldformer.data.streams`): ``next_batch()``, ``state_dict()``,
``load_state_dict()``. A batch holds independent samples: every row starts at t = 0 with
reset_mask set, T is a multiple of the segment length w, and labels are -100 everywhere but on
the answer tokens. The *level* of a task is its number of folds: a sample at level n spans
n * w tokens, so the answer is about n folds away from what it must recall.

    RecallTask   "#A123 #B907 … filler … ?B907": recall the value of a key seen n folds ago
    CopyTask     "#payload=payload": reproduce a random string as long as half the sample
    PasskeyTask  DESIGN.md §6 passkey prompt of n * w tokens, answer " NNNNN"

Curriculum: the task starts at ``n_folds`` and multiplies the level by ``factor`` (up to
``max_folds``) whenever answer accuracy at the current level, over the last ``window`` rows,
reaches ``threshold``. The trainer reports accuracy with ``task.update(logits, batch)`` (or, in
DDP, all-reduces `answer_accuracy` counts and calls ``task.curriculum.update(correct, total)``
on every rank so the ranks stay at one level).

Rows are seeded by (seed, batch index, global row), so rank r of world_size serves exactly
rows r*B … (r+1)*B−1 of the global batch, and a resumed task repeats nothing and skips nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from foldformer.data.streams import IGNORE_INDEX, Batch, check_rank
from foldformer.data.tokenizers import ByteTokenizer, Tokenizer

if TYPE_CHECKING:
    from foldformer.data.passkey import PasskeyPrompt

EVAL_SEED_OFFSET = 1_000_003  # evaluation samples never coincide with training samples


@dataclass
class Curriculum:
    """Levels climbed when accuracy at the current one passes a threshold.

    levels: increasing values (number of folds, or tokens for BABILong).
    threshold: accuracy over the last `window` answered rows needed to move up.
    mix: probability that a batch is drawn at a random lower level (keeps short ones learned).
    """

    levels: list[int]
    threshold: float = 0.95
    window: int = 256
    mix: float = 0.0
    index: int = 0
    correct: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        self.levels = [int(v) for v in self.levels]
        if not self.levels or sorted(set(self.levels)) != self.levels:
            raise ValueError(
                f"curriculum levels must be increasing and non-empty, got {self.levels}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"curriculum threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.mix < 1.0:
            raise ValueError(f"curriculum mix must be in [0, 1), got {self.mix}")

    @classmethod
    def geometric(
        cls, start: int, stop: int | None = None, factor: int = 2, **kwargs: Any
    ) -> Curriculum:
        """start, start*factor, … up to stop (stop itself included); one level if stop is None."""
        if start < 1 or factor < 2:
            raise ValueError(f"need start >= 1 and factor >= 2, got start={start}, factor={factor}")
        levels = [start]
        stop = start if stop is None else stop
        if stop < start:
            raise ValueError(f"curriculum stop={stop} is below its start={start}")
        while levels[-1] < stop:
            levels.append(min(levels[-1] * factor, stop))
        return cls(levels, **kwargs)

    @property
    def level(self) -> int:
        return self.levels[self.index]

    @property
    def done(self) -> bool:
        return self.index == len(self.levels) - 1

    def update(self, correct: int, total: int) -> bool:
        """Count answered rows at the current level; returns True if the level went up."""
        self.correct += int(correct)
        self.total += int(total)
        if self.total >= self.window and not self.done:
            if self.correct / self.total >= self.threshold:
                self.index += 1
                self.correct = self.total = 0
                return True
            self.correct = self.total = 0  # a fresh window at the same level
        return False

    def set_level(self, level: int) -> None:
        """Jump to a level (added to the levels if missing)."""
        if level not in self.levels:
            self.levels = sorted({*self.levels, int(level)})
        self.index = self.levels.index(level)
        self.correct = self.total = 0

    def set_max(self, level: int) -> None:
        """Cap the levels at `level` (added as the last level if missing)."""
        current = min(self.level, int(level))
        self.levels = sorted({*(v for v in self.levels if v < level), int(level), current})
        self.index = self.levels.index(current)
        self.correct = self.total = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "threshold": self.threshold,
            "window": self.window,
            "mix": self.mix,
            "index": self.index,
            "correct": self.correct,
            "total": self.total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, list(value) if key == "levels" else value)


def answer_accuracy(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(rows whose every answer token is the argmax, rows with an answer) for (B,T,V) logits.

    Teacher forcing on the answer equals greedy decoding here: a row counts as correct only if
    every answer token is predicted given the correct ones before it.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    mask = labels != IGNORE_INDEX
    hit = (logits.argmax(-1) == labels) | ~mask
    answered = mask.any(dim=1)
    return int((hit.all(dim=1) & answered).sum()), int(answered.sum())


@dataclass
class _Row:
    ids: list[int]
    labels: list[int]


def check_fraction(name: str, value: Any) -> float:
    """A task option that is a fraction of rows (`straddle`): a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} is a fraction of rows in [0, 1], got {value!r}")
    return float(value)


def _answer_row(prompt: list[int], answer: list[int]) -> _Row:
    """prompt + answer, with labels on the answer tokens only (already shifted)."""
    ids = list(prompt) + list(answer)
    labels = [IGNORE_INDEX] * len(ids)
    for i, token in enumerate(answer):
        labels[len(prompt) - 1 + i] = token
    return _Row(ids, labels)


class SyntheticTask:
    """Shared machinery: seeding per row, batching, curriculum, state. Subclasses build rows."""

    name = "synthetic"

    def __init__(
        self,
        batch_size: int,
        segment_len: int,
        tokenizer: Tokenizer | None = None,
        n_folds: int | None = None,
        max_folds: int | None = None,
        factor: int = 2,
        threshold: float = 0.95,
        window: int = 256,
        mix: float = 0.0,
        uniform: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(segment_len, int) and segment_len >= 1):
            raise ValueError(f"segment_len must be a positive integer, got {segment_len!r}")
        check_rank(rank, world_size)
        self.batch_size, self.segment_len = batch_size, segment_len
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rows = list(range(rank * batch_size, (rank + 1) * batch_size))
        if n_folds is None:  # the shortest sample that fits
            n_folds = 1
            while not self._fits(n_folds):
                n_folds += 1
        self.curriculum = Curriculum.geometric(
            n_folds, max_folds, factor, threshold=threshold, window=window, mix=mix
        )
        # uniform: a mixed-in batch has any number of folds from the first level up to the
        # current one, not only a lower curriculum level. A read-out trained at 1, 2, 4, … folds
        # only answers at those counts (docs/retrieval.md, "the fold counter").
        if not isinstance(uniform, bool):  # a data spec's "uniform=yes" arrives as a string
            raise ValueError(f"uniform must be true or false, got {uniform!r}")
        self.uniform = uniform
        self.batches = 0
        self._check_level(self.curriculum.levels[0])

    # -- to implement ---------------------------------------------------------------------

    def make_row(self, rng: np.random.Generator, level: int) -> _Row:
        raise NotImplementedError

    def _check_level(self, level: int) -> None:
        """Raise a clear error if a sample at this level cannot be built."""
        self.make_row(np.random.default_rng(0), level)

    def _fits(self, level: int) -> bool:
        if level > 10**6:
            raise ValueError(f"no sample of {self.name} fits in up to {10**6} folds")
        try:
            self._check_level(level)
        except ValueError:
            return False
        return True

    # -- public -----------------------------------------------------------------------------

    @property
    def level(self) -> int:
        return self.curriculum.level

    def set_folds(self, n_folds: int) -> None:
        """Fix the current level (the curriculum may still climb from there)."""
        self._check_level(n_folds)
        self.curriculum.set_level(n_folds)

    def set_max_folds(self, n_folds: int) -> None:
        """Cap the curriculum at n_folds."""
        self._check_level(n_folds)
        self.curriculum.set_max(n_folds)

    def make_batch(self, level: int, rows: list[int], batch_index: int, seed: int) -> Batch:
        """The batch of the given global rows at a level; deterministic in its arguments."""
        built = [
            self.make_row(np.random.default_rng([seed, batch_index, row]), level) for row in rows
        ]
        w = self.segment_len
        T = -(-max(len(r.ids) for r in built) // w) * w  # whole folds
        ids = torch.full((len(rows), T), self.tokenizer.eod_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(built):
            ids[i, : len(row.ids)] = torch.tensor(row.ids)
            labels[i, : len(row.labels)] = torch.tensor(row.labels)
        reset = torch.zeros((len(rows), T), dtype=torch.bool)
        reset[:, 0] = True  # every sample is independent
        return Batch(ids, labels, reset, meta={"level": level, "task": self.name})

    def _batch_level(self) -> int:
        c = self.curriculum
        if c.mix and c.index > 0:
            rng = np.random.default_rng([self.seed, self.batches, 2**32 - 1])
            if rng.random() < c.mix:
                if self.uniform:  # from the first level (KeyRecallTask's 1: any shorter one)
                    return int(rng.integers(c.levels[0], c.level))
                return c.levels[int(rng.integers(0, c.index))]
        return c.level

    def next_batch(self) -> Batch:
        batch = self.make_batch(self._batch_level(), self.rows, self.batches, self.seed)
        self.batches += 1
        return batch

    def eval_batch(self, level: int, n_rows: int, index: int = 0) -> Batch:
        """Held-out samples at a level (a seed stream disjoint from training)."""
        self._check_level(level)
        return self.make_batch(level, list(range(n_rows)), index, self.seed + EVAL_SEED_OFFSET)

    def update(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """Feed the curriculum with this batch's answer accuracy (batches at a lower, mixed-in
        level do not count). Returns metrics for logging."""
        correct, total = answer_accuracy(logits.detach(), batch.labels.to(logits.device))
        level = (batch.meta or {}).get("level", self.level)
        moved = False
        if level == self.level:
            moved = self.curriculum.update(correct, total)
        return {
            "answer_accuracy": correct / max(total, 1),
            "curriculum_level": float(self.level),
            "curriculum_advanced": float(moved),
        }

    def distance_tokens(self, level: int) -> int:
        """Tokens between what is recalled and where it is asked for, at a level."""
        return level * self.segment_len

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "uniform": self.uniform,
            "curriculum": self.curriculum.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("type", "seed", "rank", "world_size", "batch_size"):
            mine = self.name if key == "type" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume {self.name}: saved {key}={state.get(key)!r} but this run has "
                    f"{key}={mine!r}"
                )
        if state.get("uniform", self.uniform) != self.uniform:
            raise ValueError(
                f"cannot resume {self.name}: saved uniform={state['uniform']!r} but this run has "
                f"uniform={self.uniform!r}"
            )
        self.batches = int(state["batches"])
        # The curriculum's progress is restored; how batches are mixed (mix) is this run's own
        # setting: a KeyRecallTask checkpoint written before `uniform` existed saved mix=0
        # although it mixed half its batches.
        progress = {k: v for k, v in state["curriculum"].items() if k != "mix"}
        self.curriculum.load_state_dict(progress)


def _single_token_ids(tokenizer: Tokenizer, chars: str) -> list[int]:
    ids = []
    for c in chars:
        encoded = tokenizer.encode(c)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer encodes {c!r} as {len(encoded)} tokens, expected one")
        ids.append(encoded[0])
    return ids


class _SymbolTask(SyntheticTask):
    """Tasks written with single-character tokens: digits, letters and markers."""

    def __init__(self, *args: Any, **kwargs: Any):
        tokenizer = kwargs.get("tokenizer") or ByteTokenizer()
        kwargs["tokenizer"] = tokenizer
        self.digits = np.array(_single_token_ids(tokenizer, "0123456789"))
        self.letters = np.array(_single_token_ids(tokenizer, "abcdefghijklmnopqrstuvwxyz "))
        self.names = np.array(_single_token_ids(tokenizer, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
        self.key_mark, self.query_mark, self.copy_mark = _single_token_ids(tokenizer, "#?=")
        super().__init__(*args, **kwargs)


class RecallTask(_SymbolTask):
    """Associative recall across folds.

    At the start, n_pairs "#" NAME VALUE records (NAME an upper-case letter, VALUE key_len
    digits); then lower-case filler; at the very end "?" NAME and the model must produce that
    name's VALUE. A sample at level n is n * segment_len tokens long, so the value is recalled
    across about n folds (exactly `distance_tokens(n)` tokens).
    """

    name = "recall"

    def __init__(
        self, batch_size: int, segment_len: int, key_len: int = 3, n_pairs: int = 1, **kwargs: Any
    ):
        if key_len < 1 or not 1 <= n_pairs <= 26:
            raise ValueError(f"need key_len >= 1 and 1 <= n_pairs <= 26, got {key_len}, {n_pairs}")
        self.key_len, self.n_pairs = key_len, n_pairs
        super().__init__(batch_size, segment_len, **kwargs)

    def make_row(self, rng: np.random.Generator, level: int) -> _Row:
        K, P = self.key_len, self.n_pairs
        length = level * self.segment_len
        head = P * (K + 2)
        if length < head + K + 2:
            raise ValueError(
                f"a recall sample of {level} fold(s) x segment_len={self.segment_len} = {length} "
                f"tokens cannot hold {P} pair(s) of key_len={K} and the query ({head + K + 2} "
                "tokens); raise n_folds"
            )
        names = rng.choice(self.names, size=P, replace=False)
        values = rng.choice(self.digits, size=(P, K))
        prompt: list[int] = []
        for name, value in zip(names, values, strict=True):
            prompt += [self.key_mark, int(name), *map(int, value)]
        prompt += list(map(int, rng.choice(self.letters, size=length - head - K - 2)))
        asked = int(rng.integers(0, P))
        prompt += [self.query_mark, int(names[asked])]
        return _answer_row(prompt, list(map(int, values[asked])))

    def distance_tokens(self, level: int) -> int:
        # From the first pair's value to the answer: the farthest recall in the sample.
        return level * self.segment_len - self.key_len - 2


class CopyTask(_SymbolTask):
    """Copy a random string: "#" PAYLOAD "=" PAYLOAD, the payload half the sample long."""

    name = "copy"

    def make_row(self, rng: np.random.Generator, level: int) -> _Row:
        length = level * self.segment_len
        n = (length - 2) // 2
        if n < 1:
            raise ValueError(f"a copy sample of {length} tokens is too short; raise n_folds")
        alphabet = np.concatenate([self.letters[:-1], self.digits])
        payload = list(map(int, rng.choice(alphabet, size=n)))
        return _answer_row([self.key_mark, *payload, self.copy_mark], payload)

    def distance_tokens(self, level: int) -> int:
        return (level * self.segment_len - 2) // 2 + 1


class PasskeyTask(SyntheticTask):
    """The DESIGN.md §6 passkey prompt at n * segment_len tokens, key at a uniform random depth;
    the answer is " NNNNN." (labels on its tokens). Built by `foldformer.data.passkey`."""

    name = "passkey"

    def __init__(
        self,
        batch_size: int,
        segment_len: int,
        shuffle: bool = False,
        straddle: float = 0.0,
        **kwargs: Any,
    ):
        from foldformer.data.passkey import build_passkey_prompt

        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be true or false, got {shuffle!r}")
        self._build, self.shuffle = build_passkey_prompt, shuffle
        self.straddle = check_fraction("straddle", straddle)
        super().__init__(batch_size, segment_len, **kwargs)

    def make_row(self, rng: np.random.Generator, level: int) -> _Row:
        key = str(int(rng.integers(10_000, 100_000)))
        depth = float(rng.random())
        # shuffle: the filler's sentence order drawn per row (training only; §6 keeps it fixed)
        order_seed = int(rng.integers(2**62)) if self.shuffle else None

        def build(**kw: Any) -> PasskeyPrompt:
            order = None if order_seed is None else random.Random(order_seed)
            return self._build(self.tokenizer, level * self.segment_len, depth, key=key,
                               shuffle=order, **kw)  # fmt: skip

        # straddle: this fraction of rows shortened until the answer crosses a fold boundary,
        # which a prompt of n folds does only at a few n (at w = 128: 2, 5, 15, 31, 32, 256 …)
        # and the §6 1M and 16M prompts always do (docs/retrieval.md, "answers across a
        # fold"). Drawn only when asked: the other rows are unchanged.
        prompt = None
        if self.straddle and rng.random() < self.straddle:
            try:
                prompt = build(straddle=self.segment_len)
            except ValueError:  # no straddling prompt fits in so few folds: the plain one
                prompt = None
        if prompt is None:
            prompt = build()
        # The key ends with the "." that ends it in the key sentence: without a label after
        # the digits nothing teaches the model to stop, and greedy decoding runs on with more
        # digits, which the evaluation rightly counts wrong.
        return _answer_row(prompt.ids, prompt.answer_ids + self.tokenizer.encode("."))


def evaluate_accuracy(
    model: torch.nn.Module,
    task: SyntheticTask,
    level: int,
    n_samples: int = 100,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of held-out samples at a level whose whole answer the model gets right."""
    from foldformer.generate import ingest

    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for index in range(-(-n_samples // batch_size)):
            rows = min(batch_size, n_samples - index * batch_size)
            batch = task.eval_batch(level, rows, index).to(device)
            # Stream the prompt and score only the tail that holds the answers: logits of a
            # whole long sample would not fit (streaming equivalence makes this exact).
            answered = (batch.labels != IGNORE_INDEX).any(dim=0).nonzero()
            tail = int(answered[0]) if len(answered) else 0
            state = ingest(model, batch.input_ids[:, :tail]) if tail else None
            logits = model(batch.input_ids[:, tail:], memory=state).logits
            c, t = answer_accuracy(logits, batch.labels[:, tail:])
            correct, total = correct + c, total + t
    model.train(was_training)
    return correct / max(total, 1)


TASKS = {"recall": RecallTask, "copy": CopyTask, "passkey": PasskeyTask}
