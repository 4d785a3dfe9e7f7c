"""`--data` specs: strings that name a training batch source.

    PATH[?options]                  text (files, dirs, .jsonl, .parquet, tar, hf:NAME): one
                                    TextStreams over all text specs given, tokenized and cached
    synthetic:recall[?options]      RecallTask  (options: key_len, n_pairs, n_folds, max_folds,
                                    factor, threshold, window, mix, uniform)
    synthetic:copy[?options]        CopyTask    (the same but key_len, n_pairs)
    synthetic:passkey[?options]     PasskeyTask (the same but key_len, n_pairs; and shuffle,
                                    straddle)
    babilong:qa1[:BABI][?options]   BabilongTask; BABI is a bAbI directory or file (default:
                                    $FOLDFORMER_BABI); options: books=PATH (background text),
                                    lengths=0,256,1024, max_tokens, threshold, window, mix,
                                    uniform, straddle, permute

mix: the probability that a batch is at a shorter length than the curriculum's; uniform=true:
such a batch has any length from the first level up to the current one (folds; tokens for
BABILong), not only a lower level. Passkey training only: shuffle=true puts each group of five
filler sentences in a random order; straddle=P shortens a fraction P of the rows until the
answer crosses a fold boundary (docs/retrieval.md); for BABILong, straddle=P builds a fraction
P of the rows to whole folds, and permute=true renames each training story's people, places and
objects by a random permutation (so a story cannot be remembered).

Example: ``synthetic:recall?key_len=3&max_folds=512`` or
``babilong:qa1:../shared/data/babi/en-10k?books=../shared/data/books&max_tokens=2048``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldformer.data.streams import BatchSource
from foldformer.data.text import DataError
from foldformer.data.tokenizers import Tokenizer

TASK_PREFIXES = ("synthetic:", "babilong:")


@dataclass
class DataSpec:
    """A parsed --data spec: kind "text" (paths), "synthetic" or "babilong" (a task)."""

    kind: str
    task: str = ""
    paths: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def build(
        self,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        segment_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> BatchSource:
        """The batch source. Text uses seq_len; tasks set their own length (their curriculum
        level) and ignore it."""
        common = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        if self.kind == "text":
            from foldformer.data.cache import tokenize_corpus
            from foldformer.data.streams import TextStreams

            corpus = tokenize_corpus(self.paths, tokenizer, cache_dir, progress=progress)
            return TextStreams(corpus, seq_len=seq_len, segment_len=segment_len, **common)
        if self.kind == "synthetic":
            from foldformer.data.synthetic import TASKS

            task, options = TASKS[self.task], dict(self.options)
        else:
            from foldformer.data.babilong import BabilongTask

            task, options = BabilongTask, dict(self.options)
            options.update(babi=options.pop("babi"), background=options.pop("books", None))
            options["task"] = self.task
        try:  # a bad option value ("mix=2", "straddle=2"): one line naming the task
            return task(segment_len=segment_len, tokenizer=tokenizer, **common, **options)
        except DataError:
            raise
        except ValueError as error:
            raise DataError(f"data spec {self.kind}:{self.task}: {error}") from None


def _convert(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if "," in value:
        return [_convert(v) for v in value.split(",") if v]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _task_options(spec: str, query: str, allowed: set[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"option {item!r} in data spec {spec!r} is not of the form key=value")
        if key not in allowed:
            raise DataError(
                f"unknown option {key!r} in data spec {spec!r}; known: {', '.join(sorted(allowed))}"
            )
        options[key] = _convert(value)
    if "lengths" in options and not isinstance(options["lengths"], list):
        options["lengths"] = [options["lengths"]]
    return options


def _constructor_options(cls: type) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters)
    return names - {
        "self",
        "args",
        "kwargs",
        "batch_size",
        "segment_len",
        "tokenizer",
        "seed",
        "rank",
        "world_size",
        "babi",
        "background",
        "task",
    }


def parse_data_spec(spec: str) -> DataSpec:
    """Parse one --data string (see the module docstring)."""
    spec = os.fspath(spec)
    if spec.startswith("synthetic:"):
        from foldformer.data.synthetic import TASKS

        name, _, query = spec[len("synthetic:") :].partition("?")
        if name not in TASKS:
            raise DataError(
                f"unknown synthetic task {name!r} in {spec!r}; known: {', '.join(sorted(TASKS))}"
            )
        return DataSpec(
            "synthetic", name, options=_task_options(spec, query, _constructor_options(TASKS[name]))
        )
    if spec.startswith("babilong:"):
        from foldformer.data.babilong import BABI_TASKS, BabilongTask

        body, _, query = spec[len("babilong:") :].partition("?")
        task, _, path = body.partition(":")
        if task not in BABI_TASKS:
            raise DataError(
                f"unknown BABILong task {task!r} in {spec!r}; known: {', '.join(BABI_TASKS)}"
            )
        path = path or os.environ.get("FOLDFORMER_BABI", "")
        if not path:
            raise DataError(
                f"{spec!r} names no bAbI files: write babilong:{task}:PATH (a bAbI directory or "
                "file) or set FOLDFORMER_BABI"
            )
        if not Path(path).exists():
            raise FileNotFoundError(f"bAbI path {path!r} in data spec {spec!r} does not exist")
        options = _task_options(spec, query, _constructor_options(BabilongTask) | {"books"})
        return DataSpec("babilong", task, options={"babi": path, **options})
    return DataSpec("text", paths=[spec])


def build_batch_source(
    specs: str | list[str],
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    segment_len: int,
    **kwargs: Any,
) -> BatchSource:
    """One batch source from the --data specs: all text specs become one stream corpus; a task
    spec must come alone."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    if not specs:
        raise DataError("no --data spec given")
    parsed = [parse_data_spec(s) for s in specs]
    tasks = [p for p in parsed if p.kind != "text"]
    if tasks and len(parsed) > 1:
        raise DataError(
            f"a task spec ({', '.join(s for s in specs if s.startswith(TASK_PREFIXES))}) cannot be "
            "combined with other --data specs; give it alone"
        )
    spec = tasks[0] if tasks else DataSpec("text", paths=[p for d in parsed for p in d.paths])
    return spec.build(tokenizer, batch_size, seq_len, segment_len, **kwargs)


# The name the trainer imports.
make_batch_source = build_batch_source
