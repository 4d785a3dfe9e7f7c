"""BABILong (Kuratov et al. 2024; DESIGN.md §6): bAbI facts hidden in book text.

A bAbI sample's facts are placed, in order, at random sentence boundaries of a run of
background sentences from books, until the sample has n tokens; the question comes last::

    <background …> Mary moved to the bathroom. <background …> John went to the hallway.
    <background …> Question: Where is Mary? Answer: bathroom

Pieces (sentences, facts, the question) are tokenized separately, each after a space, and
concatenated, so the length is exact: a sample never exceeds n tokens and falls short by less
than one background sentence. n = 0 gives the facts and the question alone.

The same builder serves evaluation (`foldformer eval babilong`) and training
(`BabilongTask`, data spec ``babilong:qa1[:BABI_PATH]?books=BOOKS``, a curriculum over length).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foldformer.data.streams import IGNORE_INDEX, Batch
from foldformer.data.synthetic import Curriculum, SyntheticTask, _answer_row, _Row, check_fraction
from foldformer.data.text import DataError, iter_documents
from foldformer.data.tokenizers import Tokenizer

BABI_TASKS = ("qa1", "qa2", "qa4", "qa5")
QUESTION_TEMPLATE = "Question: {question} Answer:"


@dataclass(frozen=True)
class BabiSample:
    """One bAbI question with the story facts before it."""

    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]  # indices into facts
    story: int  # story number in its file (questions of one story share facts)


def babi_file(task: str, path: str | os.PathLike) -> Path:
    """The training file of a task ("qa1") in a bAbI directory, or `path` itself if a file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"bAbI path {str(path)!r} does not exist")
    if not re.fullmatch(r"qa\d+", task):
        raise DataError(f"bAbI task must look like 'qa1', got {task!r}")
    matches = sorted(path.rglob(f"{task}_*_train.txt"))
    if not matches:
        raise FileNotFoundError(f"no {task}_*_train.txt under {str(path)!r}")
    return matches[0]


def load_babi(path: str | os.PathLike) -> list[BabiSample]:
    """Parse a bAbI file: numbered lines, a story restarting at 1, question lines
    ``N question<TAB>answer<TAB>supporting ids``."""
    path = Path(path)
    samples: list[BabiSample] = []
    facts: list[str] = []
    ids: dict[int, int] = {}  # line number -> index into facts
    story = -1
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        number, _, rest = line.partition(" ")
        if not number.isdigit():
            raise DataError(f"{path}:{line_no}: expected a line number, got {line[:40]!r}")
        if int(number) == 1:
            facts, ids, story = [], {}, story + 1
        if "\t" in rest:
            parts = rest.split("\t")
            if len(parts) < 2:
                raise DataError(f"{path}:{line_no}: question line without an answer")
            supporting = tuple(ids[int(i)] for i in parts[2].split()) if len(parts) > 2 else ()
            samples.append(
                BabiSample(tuple(facts), parts[0].strip(), parts[1].strip(), supporting, story)
            )
        else:
            ids[int(number)] = len(facts)
            facts.append(rest.strip())
    if not samples:
        raise DataError(f"{path} holds no bAbI questions")
    return samples


def split_babi(
    samples: list[BabiSample], validation_fraction: float = 0.1
) -> tuple[list[BabiSample], list[BabiSample]]:
    """(train, validation): the last fraction of stories is validation, so no story's facts
    appear on both sides. Deterministic."""
    n_stories = samples[-1].story + 1
    first_val = n_stories - max(1, round(n_stories * validation_fraction))
    train = [s for s in samples if s.story < first_val]
    validation = [s for s in samples if s.story >= first_val]
    return train, validation


# The entity classes of bAbI tasks 1-5 (en-10k). Renaming one class's words by a permutation,
# the same in a sample's facts, question and answer, keeps every answer of these tasks true
# (not of tasks whose answers need world knowledge, such as qa20's "hungry -> kitchen").
BABI_ENTITIES = {
    "person": ("Bill", "Daniel", "Fred", "Jeff", "John", "Mary", "Sandra"),
    "place": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "object": ("apple", "football", "milk"),
}


def entity_classes(samples: list[BabiSample]) -> list[tuple[str, ...]]:
    """The words of each `BABI_ENTITIES` class that occur in `samples` (a task's vocabulary:
    qa1's people are Daniel, John, Mary and Sandra, qa5's Bill, Fred, Jeff and Mary), classes
    with at least two of them."""
    words = {w for s in samples for text in (*s.facts, s.question, s.answer)
             for w in re.findall(r"[A-Za-z]+", text)}  # fmt: skip
    found = [tuple(w for w in names if w in words) for names in BABI_ENTITIES.values()]
    return [names for names in found if len(names) > 1]


def permute_entities(
    sample: BabiSample, classes: list[tuple[str, ...]], rng: np.random.Generator
) -> BabiSample:
    """The sample with each class's words renamed by a random permutation of that class: the
    same story with other people, places and objects, so a model cannot answer by
    remembering a training story (without it, a 0.44M-parameter model reached 94% on its
    training questions and 54% on held-out ones; docs/retrieval.md)."""
    mapping = {}
    for names in classes:
        mapping.update(zip(names, (names[i] for i in rng.permutation(len(names))), strict=True))
    if not mapping:
        return sample
    pattern = re.compile(r"\b(" + "|".join(mapping) + r")\b")

    def rename(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(0)], text)

    return BabiSample(tuple(rename(f) for f in sample.facts), rename(sample.question),
                      rename(sample.answer), sample.supporting, sample.story)  # fmt: skip


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, whitespace normalised (a simple rule: end mark, space, capital)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def load_background(
    spec: str | os.PathLike | list, max_sentence_chars: int = 500, **document_options: Any
) -> list[str]:
    """Background sentences from books (any data spec); very long "sentences" (tables,
    lists without end marks) are dropped."""
    sentences: list[str] = []
    for document in iter_documents(spec, **document_options):
        sentences += [s for s in split_sentences(document.text) if len(s) <= max_sentence_chars]
    if not sentences:
        raise DataError(f"no background sentences in {spec}")
    return sentences


def _cyclic(seq, start: int, end: int) -> list:
    """Slices covering items start..end of `seq` repeated end to end."""
    parts = []
    while start < end:
        at = start % len(seq)
        take = min(end - start, len(seq) - at)
        parts.append(seq[at : at + take])
        start += take
    return parts


class TokenizedBackground:
    """Background sentences tokenized once, each as " " + sentence, in one flat array, so a long
    prompt is cut from it in slices rather than encoded a sentence at a time (a 1M-token
    prompt is ten thousand sentences). Positions past the end wrap around to the start."""

    def __init__(self, sentences: list[str], tokenizer: Tokenizer):
        if not sentences:
            raise ValueError("background needs at least one sentence")
        self.sentences = list(sentences)
        encode = getattr(tokenizer, "encode_array", tokenizer.encode)  # bytes: no Python list
        pieces = [np.asarray(encode(" " + s)) for s in self.sentences]
        self.ids = np.concatenate(pieces).astype(np.int32)
        # starts[j]: token offset of sentence j (starts[-1] = all tokens)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])

    def __len__(self) -> int:
        return len(self.sentences)

    def offset(self, sentence: int) -> int:
        """Token offset of sentence index `sentence` (wrapping)."""
        passes, j = divmod(sentence, len(self.sentences))
        return passes * int(self.starts[-1]) + int(self.starts[j])

    def fitting(self, first: int, budget: int, limit: int) -> int:
        """How many whole sentences from `first` on fit in `budget` tokens, at most `limit`."""
        passes, rest = divmod(self.offset(first) + budget, int(self.starts[-1]))
        last = passes * len(self) + int(np.searchsorted(self.starts, rest, side="right")) - 1
        return max(0, min(last - first, limit))

    def sentence_at(self, offset: int) -> int:
        """The first sentence index (wrapping) that starts at or after token `offset`."""
        passes, rest = divmod(offset, int(self.starts[-1]))
        return passes * len(self) + int(np.searchsorted(self.starts, rest, side="left"))

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens start..end (token offsets, wrapping)."""
        parts = _cyclic(self.ids, start, end)
        return np.concatenate(parts) if parts else self.ids[:0]

    def text(self, first: int, end: int) -> str:
        """Sentences first..end (sentence indices, wrapping) joined by spaces."""
        return " ".join(" ".join(part) for part in _cyclic(self.sentences, first, end))


@dataclass
class BabilongExample:
    """One BABILong sample, tokenized."""

    input_ids: np.ndarray  # int32: the whole prompt, ending with the question and "Answer:"
    answer: str
    answer_ids: list[int]  # tokens of " " + answer
    fact_positions: list[int]  # token index where each fact starts, in order
    n_background: int  # whole background sentences used
    text: str  # the prompt as text (pieces joined by spaces)


def build_babilong_sample(
    sample: BabiSample,
    background: list[str] | TokenizedBackground,
    n_tokens: int,
    tokenizer: Tokenizer,
    rng: np.random.Generator,
    template: str = QUESTION_TEMPLATE,
    exact: bool = False,
    facts_within: int = 0,
    facts_at: str = "end",
) -> BabilongExample:
    """Hide the sample's facts, in order, at random sentence boundaries of a contiguous run of
    background sentences (from a random start) so that the prompt has at most n_tokens tokens
    and falls short by less than one sentence. n_tokens=0: facts and question only.

    background: sentences, or a `TokenizedBackground` (tokenized once: pass one for repeated
    calls; a list is tokenized on every call). exact: the run may wrap around past the last
    sentence, and the shortfall is filled with the tokens that follow the run (a cut sentence
    just before the question), so every prompt has exactly n_tokens tokens and prompts of one
    length batch together (unless the facts and question alone are longer).

    facts_within: a diagnosis of what the memory loses (0: anywhere, the default). The facts
    go only at boundaries within the first (facts_at="start") or the last ("end") facts_within
    tokens of background, so at a fixed length "end" measures the memory after a long run of
    background with the facts near the question, and "start" the facts carried the whole way.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if facts_within < 0:
        raise ValueError(f"facts_within must be >= 0, got {facts_within}")
    if facts_at not in ("start", "end"):
        raise ValueError(f"facts_at must be 'start' or 'end', got {facts_at!r}")

    def enc(text: str, first: bool = False) -> np.ndarray:
        return np.asarray(tokenizer.encode(text if first else " " + text), dtype=np.int32)

    # Budget every piece with its spaced encoding: the one piece that opens the prompt is
    # encoded without the space and can only get shorter, so the total never exceeds n_tokens.
    question_text = template.format(question=sample.question)
    question = enc(question_text)
    facts = [enc(f) for f in sample.facts]
    used = len(question) + sum(len(f) for f in facts)
    first = count = 0
    if n_tokens > 0:
        if not len(background):
            raise ValueError("n_tokens > 0 needs background sentences")
        if not isinstance(background, TokenizedBackground):
            background = TokenizedBackground(background, tokenizer)
        first = int(rng.integers(0, len(background)))
        limit = n_tokens if exact else len(background)  # one pass unless exact
        count = background.fitting(first, max(0, n_tokens - used), limit)
    # Facts go at sorted random boundaries low..high (0..count unless facts_within), keeping
    # their order; the sentences between two boundaries holding facts are one piece.
    low, high = 0, count
    if facts_within and count:
        if facts_at == "start":
            high = background.fitting(first, facts_within, count)
        else:  # the first boundary with at most facts_within tokens of background after it
            start = background.offset(first + count) - facts_within
            low = min(count, max(0, background.sentence_at(start) - first))
    slots = np.sort(rng.integers(low, high + 1, size=len(facts))).tolist() if facts else []
    pieces: list[tuple[str, str, np.ndarray]] = []  # (kind, text, tokens)
    done = 0  # sentences placed
    for boundary, fact_text, fact in zip(
        [*slots, count], [*sample.facts, None], [*facts, None], strict=True
    ):
        if boundary > done:
            a, b = first + done, first + boundary
            ids = background.tokens(background.offset(a), background.offset(b))
            pieces.append(("background", background.text(a, b), ids))
            done = boundary
        if fact is not None:
            pieces.append(("fact", fact_text, fact))
    pieces.append(("question", question_text, question))
    kind, text, ids = pieces[0]
    if kind == "background":  # only its first sentence loses the space
        sentence = background.sentences[first]
        head = background.offset(first + 1) - background.offset(first)
        pieces[0] = (kind, text, np.concatenate([enc(sentence, True), ids[head:]]))
    else:
        pieces[0] = (kind, text, enc(text, True))
    short = n_tokens - sum(len(p[2]) for p in pieces)
    if exact and n_tokens > 0 and short > 0:
        start = background.offset(first + count)
        ids = background.tokens(start, start + short)
        pieces.insert(-1, ("cut", tokenizer.decode(ids.tolist()).lstrip(), ids))

    starts = np.cumsum([0] + [len(p[2]) for p in pieces])
    return BabilongExample(
        input_ids=np.concatenate([p[2] for p in pieces]),
        answer=sample.answer,
        answer_ids=enc(sample.answer).tolist(),
        fact_positions=[int(starts[k]) for k, p in enumerate(pieces) if p[0] == "fact"],
        n_background=count,
        text=" ".join(p[1] for p in pieces),
    )


class BabilongTask(SyntheticTask):
    """BABILong samples as a training batch source, with a curriculum over length.

    Levels are prompt lengths in tokens (`lengths`, default 0, 256, 512, … up to max_tokens);
    the model is trained to produce the answer and a "." after "Answer:" (labels on those only).
    Samples come from the training split of the bAbI file (see `split_babi`). straddle: a
    training option, the fraction of rows built to exactly a whole number of folds (the
    answer across a fold boundary, as in `eval babilong --exact` at a multiple of w); it
    applies to `eval_batch`'s held-out rows too, which follow the training distribution.
    permute: rename the people, places and objects of every training sample by a random
    permutation of each (`permute_entities`); held-out rows are not renamed.
    """

    name = "babilong"

    def __init__(
        self,
        batch_size: int,
        segment_len: int,
        babi: str | os.PathLike | list[BabiSample],
        background: str | os.PathLike | list[str] | None = None,
        task: str = "qa1",
        lengths: list[int] | None = None,
        max_tokens: int = 4096,
        threshold: float = 0.9,
        window: int = 256,
        mix: float = 0.0,
        validation_fraction: float = 0.1,
        straddle: float = 0.0,
        permute: bool = False,
        **kwargs: Any,
    ):
        self.straddle = check_fraction("straddle", straddle)
        samples = babi if isinstance(babi, list) else load_babi(babi_file(task, babi))
        self.train_samples, self.validation_samples = split_babi(samples, validation_fraction)
        if not isinstance(permute, bool):
            raise ValueError(f"permute must be true or false, got {permute!r}")
        self.permute = permute
        self.entity_classes = entity_classes(self.train_samples) if permute else []
        if permute and not self.entity_classes:
            names = ", ".join(w for c in BABI_ENTITIES.values() for w in c)
            raise ValueError(f"permute: no two people, places or objects of bAbI tasks 1-5 "
                             f"({names}) in the {task} samples")  # fmt: skip
        if background is None:
            sentences: list[str] = []
        elif isinstance(background, list):
            sentences = background
        else:
            sentences = load_background(background)
        if lengths is None:
            lengths = [0]
            while lengths[-1] < max_tokens:
                lengths.append(min(max(256, 2 * lengths[-1]), max_tokens))
        if any(n > 0 for n in lengths) and not sentences:
            raise DataError(
                f"BABILong lengths {lengths} need background books: give background=BOOKS "
                "(data spec option ?books=PATH); only length 0 works without them"
            )
        self.task = task
        super().__init__(
            batch_size, segment_len, threshold=threshold, window=window, mix=mix, **kwargs
        )
        self.curriculum = Curriculum(lengths, threshold=threshold, window=window, mix=mix)
        self.background = TokenizedBackground(sentences, self.tokenizer) if sentences else []

    def _check_level(self, level: int) -> None:
        if level < 0:
            raise ValueError(f"BABILong length must be >= 0, got {level}")

    def make_row(self, rng: np.random.Generator, level: int, validation: bool = False) -> _Row:
        pool = self.validation_samples if validation else self.train_samples
        sample = pool[int(rng.integers(0, len(pool)))]
        if self.permute and not validation:
            sample = permute_entities(sample, self.entity_classes, rng)
        # straddle: this fraction of rows is built to exactly a whole number of folds, as
        # `eval babilong --exact` and babilong_gpu.py build their prompts at lengths that are
        # multiples of w: the answer then starts a new fold and is written
        # with the question in memory only (docs/retrieval.md, "answers across a fold"). A
        # prompt of `level` tokens otherwise falls short by part of a sentence, and its answer
        # crosses a fold boundary in a few rows only. Drawn only when asked: the other rows
        # are unchanged.
        n_tokens, exact = level, False
        if self.straddle and rng.random() < self.straddle and level >= self.segment_len:
            n_tokens, exact = level // self.segment_len * self.segment_len, True
        example = build_babilong_sample(
            sample, self.background, n_tokens, self.tokenizer, rng, exact=exact
        )
        # The answer ends with a labelled "." (as PasskeyTask's key): with labels on the word
        # alone nothing teaches the model to stop, greedy decoding runs on (" officennnn") and
        # the first word is wrong although the model found the answer. (A tokenizer that
        # encodes "." with a word-start marker, SentencePiece's "▁.", teaches " office ." —
        # the first word is still "office".)
        stop = list(self.tokenizer.encode("."))
        return _answer_row(example.input_ids.tolist(), example.answer_ids + stop)

    def eval_batch(self, level: int, n_rows: int, index: int = 0) -> Batch:
        """Samples from the validation stories at a length."""
        make_row = self.make_row
        self.make_row = lambda rng, lvl: make_row(rng, lvl, validation=True)  # type: ignore[method-assign]
        try:
            return super().eval_batch(level, n_rows, index)
        finally:
            del self.make_row

    def distance_tokens(self, level: int) -> int:
        return level


__all__ = [
    "BABI_ENTITIES",
    "BABI_TASKS",
    "BabiSample",
    "BabilongExample",
    "BabilongTask",
    "IGNORE_INDEX",
    "TokenizedBackground",
    "babi_file",
    "build_babilong_sample",
    "entity_classes",
    "load_babi",
    "load_background",
    "permute_entities",
    "split_babi",
    "split_sentences",
]
