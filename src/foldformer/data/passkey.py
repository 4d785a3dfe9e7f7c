"""Passkey retrieval prompts (Mohtashami and Jaggi 2023; DESIGN.md §6).

A filler of five sentences repeated, the key sentence inserted at depth p of the context, the
question at the end::

    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.
    The grass is green. … The pass key is 68512. Remember it. 68512 is the pass key. The grass …
    … There and back again. What is the pass key? The pass key is

The model must continue with " 68512". Pieces are tokenized separately at sentence boundaries
(each after a space) and concatenated, so a million-token prompt costs five small encodes, and
the prompt length is exact: the whole prompt has at most `n_tokens` tokens and is shorter by
less than one filler sentence (more with the training option `straddle`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
QUESTION = "What is the pass key? The pass key is"


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass
class PasskeyPrompt:
    """One prompt: its ids, where the key sits, and the expected answer."""

    ids: list[int]  # the whole prompt, ending with the question
    key: str  # the 5 digits
    answer: str  # the continuation the model must produce: " " + key
    answer_ids: list[int]
    key_start: int  # index in `ids` of the key sentence's first token
    key_end: int  # index just after the key sentence
    context_len: int  # tokens before the question (filler and key sentence)
    depth: float  # requested depth p
    actual_depth: float  # key_start / (context_len - key sentence length)

    @property
    def question_ids(self) -> list[int]:
        return self.ids[self.context_len :]


def random_key(rng: random.Random, digits: int = 5) -> str:
    """A key of `digits` digits without a leading zero."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def build_passkey_prompt(
    tokenizer,
    n_tokens: int,
    depth: float,
    key: str | int | None = None,
    seed: int | None = None,
    shuffle: random.Random | None = None,
    straddle: int | None = None,
) -> PasskeyPrompt:
    """A passkey prompt of at most `n_tokens` tokens (within one filler sentence of it, unless
    `straddle` shortens it).

    depth p in [0, 1]: the key sentence starts after the filler sentence boundary nearest to
    the fraction p of the filler (0: first thing in the prompt, 1: right before the question).
    key: the digits to hide; drawn from `seed` when None (5 digits).
    shuffle: a training option (not §6): each whole group of five filler sentences in an order
    drawn from this generator instead of the fixed one, so the state after n folds of filler is
    not a function of n alone (docs/retrieval.md, "the fold counter").
    straddle: a training option (not §6), a segment length w: the prompt keeps the largest
    number of filler sentences (within the budget) for which its answer straddles a fold
    boundary of a stream of w-token folds (`answer_straddles`: the prompt's last token and the
    answer's last token, fed to predict the stop, are in different folds; docs/retrieval.md,
    "answers across a fold"). ValueError if no prompt within the budget does.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if key is None:
        key = random_key(random.Random(seed))
    key = str(key)
    if not key.isdigit():
        raise ValueError(f"key must be digits, got {key!r}")

    def enc(text: str, first: bool) -> list[int]:
        return list(tokenizer.encode(text if first else " " + text))

    # Every piece but the very first is encoded after a space, as it appears in the text.
    key_first, key_later = enc(key_sentence(key), True), enc(key_sentence(key), False)
    question = enc(QUESTION, False)
    first_filler = [enc(s, True) for s in FILLER_SENTENCES]
    later_filler = [enc(s, False) for s in FILLER_SENTENCES]
    budget = n_tokens - len(question) - max(len(key_first), len(key_later))
    if budget < 0:
        raise ValueError(
            f"n_tokens={n_tokens} is too short for a passkey prompt: the key sentence and the "
            f"question alone take {n_tokens - budget} tokens"
        )

    # Filler lengths: sentence i of the filler is FILLER_SENTENCES[i % 5]; a sentence that
    # opens the prompt (depth 0 puts the key first) is encoded without a leading space.
    cycle = [len(t) for t in later_filler]
    per_cycle = sum(cycle)
    n_sentences = 5 * (budget // per_cycle)
    used = per_cycle * (budget // per_cycle)
    while used + cycle[n_sentences % 5] <= budget:
        used += cycle[n_sentences % 5]
        n_sentences += 1
    order = None  # the filler's sentence order, when not FILLER_SENTENCES[i % 5]
    if shuffle is not None:  # each whole group a permutation (the same length), then the rest
        order = [j for _ in range(n_sentences // 5) for j in shuffle.sample(range(5), 5)]
        order += list(range(n_sentences - len(order)))
    answer_ids = list(tokenizer.encode(" " + key))
    if straddle is not None:
        n_sentences = _straddling_sentences(
            straddle, n_sentences, depth, len(answer_ids), len(question),
            (len(key_first), len(key_later)),
            [(len(first_filler[j]), len(later_filler[j])) for j in range(5)],
            order if order is not None else [i % 5 for i in range(n_sentences)],
        )  # fmt: skip
        order = order[:n_sentences] if order is not None else None
    insert_at = round(depth * n_sentences)  # number of filler sentences before the key

    # Long prompts repeat whole cycles: build one cycle once and multiply.
    cycle_ids = [t for s in later_filler for t in s]

    def filler(first: int, last: int, opens_prompt: bool) -> list[int]:
        """Filler sentences first..last-1 (sentence i is FILLER_SENTENCES[i % 5])."""
        out: list[int] = []
        i = first
        if opens_prompt and i < last:
            out += first_filler[i % 5]
            i += 1
        while i < last and i % 5:
            out += later_filler[i % 5]
            i += 1
        whole = (last - i) // 5
        out += cycle_ids * whole
        i += 5 * whole
        while i < last:
            out += later_filler[i % 5]
            i += 1
        return out

    if order is not None:

        def filler(first: int, last: int, opens_prompt: bool) -> list[int]:  # noqa: F811
            pieces = [(first_filler if opens_prompt and i == first else later_filler)[order[i]]
                      for i in range(first, last)]  # fmt: skip
            return [t for piece in pieces for t in piece]

    ids = filler(0, insert_at, opens_prompt=True)
    key_ids = key_first if insert_at == 0 else key_later
    key_start = len(ids)
    ids += key_ids
    key_end = len(ids)
    ids += filler(insert_at, n_sentences, opens_prompt=False)
    context_len = len(ids)
    ids += question
    if len(ids) > n_tokens:  # the first sentence without its space can only be shorter
        raise AssertionError(f"passkey prompt overran its budget: {len(ids)} > {n_tokens}")
    if straddle is not None and not answer_straddles(len(ids), len(answer_ids), straddle):
        raise AssertionError(f"passkey prompt of {len(ids)} tokens does not straddle a fold")
    filler_len = context_len - len(key_ids)
    return PasskeyPrompt(
        ids=ids,
        key=key,
        answer=" " + key,
        answer_ids=answer_ids,
        key_start=key_start,
        key_end=key_end,
        context_len=context_len,
        depth=depth,
        actual_depth=key_start / filler_len if filler_len else 0.0,
    )


def answer_straddles(prompt_len: int, answer_len: int, segment_len: int) -> bool:
    """Whether greedy decoding of an answer of answer_len tokens after a prompt of prompt_len
    tokens crosses a fold boundary of a stream of segment_len-token folds: the prompt's last
    token and the answer's last token lie in different folds. The answer's last token is fed
    too: the prediction after it must stop the answer (a sixth digit, or a longer word, is
    wrong). Past the boundary the rest is written with the question in memory only."""
    return (prompt_len - 1) // segment_len != (prompt_len + answer_len - 1) // segment_len


def _straddling_sentences(
    w: int,
    n_max: int,
    depth: float,
    answer_len: int,
    question_len: int,
    key_lens: tuple[int, int],
    sentence_lens: list[tuple[int, int]],
    order: list[int],
) -> int:
    """The largest n <= n_max filler sentences whose prompt's answer straddles a fold of w.
    key_lens and sentence_lens: (opening the prompt, after a space) token counts; order: the
    filler's sentence indices. The same lengths `build_passkey_prompt` assembles."""
    later = [sentence_lens[j][1] for j in order]
    filler = sum(later)
    for n in range(n_max, -1, -1):
        if n < n_max:
            filler -= later[n]
        if round(depth * n) == 0:  # the key opens the prompt
            length = key_lens[0] + filler
        else:  # the first filler sentence opens it
            length = key_lens[1] + filler - later[0] + sentence_lens[order[0]][0]
        if answer_straddles(length + question_len, answer_len, w):
            return n
    raise ValueError(f"no passkey prompt within the budget has an answer straddling a fold of {w}")


__all__ = [
    "FILLER_SENTENCES",
    "QUESTION",
    "PasskeyPrompt",
    "answer_straddles",
    "build_passkey_prompt",
    "key_sentence",
]
