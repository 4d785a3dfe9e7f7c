"""The evaluation suite, one code path for `foldformer eval` and `foldformer compare`.

`EvalSettings` holds every setting of ECL, passkey, bits per byte and memory/speed (compare's
``[eval]`` section; each `eval` command fills the fields of its flags). `HeldOutDocuments`
reads held-out text once, as tokens through the token cache the trainer uses and as text.
`run_ecl`, `run_passkey`, `run_lm` and `run_memory` evaluate one loaded model and return the
result with its records; `evaluate_model` runs the chosen ones on a checkpoint. So `eval ecl`
and `compare` give one answer on one checkpoint with the same settings and documents.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foldformer.config import ConfigError, JsonConfig
from foldformer.evaluate.common import (
    DTYPES,
    EvaluationError,
    SettingError,
    check_field_types,
    eval_config,
    format_size,
    load_checkpoint,
    parse_list,
    parse_size,
)

EVALUATIONS = ("ecl", "passkey", "lm", "memory")


@dataclass
class EvalSettings(JsonConfig):
    """The evaluation suite's settings (docs/evaluation.md); compare's [eval] section."""

    run: list[str] = field(default_factory=lambda: list(EVALUATIONS))  # which evaluations
    dtype: str = "float32"
    seed: int = 0
    # effective context length
    ecl_targets: int = 100
    ecl_max_distance: int = 512
    ecl_unit: int = 0  # grid unit; 0: the model's w (compare: the folded model's, one grid)
    ecl_batch_size: int = 16
    ecl_bootstrap: int = 2000
    ecl_min_gain: float = 0.0
    # also score each target after unrelated text of the same length (docs/evaluation.md): the
    # content gain separates a memory that carries the text from a state that warms up
    ecl_control: bool = False
    # passkey retrieval
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_samples: int = 10
    passkey_batch_size: int = 8
    # bits per byte on the held-out documents
    lm_max_documents: int = 0  # 0: all
    lm_max_tokens: int = 20000  # per document; 0: all
    # memory and speed
    memory_lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    memory_modes: list[str] = field(default_factory=lambda: ["inference"])
    memory_batch_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.run, str):
            self.run = self.run.split(",")
        # sizes may be written "4K"; lists may be written "1K,4K"
        self.ecl_max_distance = self._parsed("ecl_max_distance", parse_size)
        self.passkey_lengths = self._parsed("passkey_lengths", parse_list)
        self.passkey_depths = self._parsed("passkey_depths", lambda v: parse_list(v, float))
        self.memory_lengths = self._parsed("memory_lengths", parse_list)
        self.memory_modes = self._parsed("memory_modes", lambda v: parse_list(v, str))
        check_field_types(self, "eval")
        check = self._check
        unknown = [e for e in self.run if e not in EVALUATIONS]
        check(not unknown, "run", f"unknown evaluation(s) {unknown}; known: {list(EVALUATIONS)}")
        check(self.dtype in DTYPES, "dtype", f"not one of {sorted(DTYPES)}")
        check(set(self.memory_modes) <= {"inference", "training"}, "memory_modes",
              "use inference and/or training")  # fmt: skip
        check(self.ecl_targets >= 2, "ecl_targets", "must be >= 2 (the bootstrap resamples them)")
        for name in ("ecl_max_distance", "ecl_batch_size", "ecl_bootstrap",
                     "passkey_samples", "passkey_batch_size", "memory_batch_size"):  # fmt: skip
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.ecl_unit >= 0, "ecl_unit", "must be >= 0 (0: the model's w)")
        for name in ("lm_max_documents", "lm_max_tokens"):
            check(getattr(self, name) >= 0, name, "must be >= 0 (0: all)")
        for name in ("passkey_lengths", "memory_lengths"):
            check(min(getattr(self, name)) >= 1, name, "lengths must be >= 1")
        check(
            all(0 <= d <= 1 for d in self.passkey_depths), "passkey_depths", "depths lie in [0, 1]"
        )

    def _check(self, ok: bool, name: str, problem: str) -> None:
        if not ok:
            raise SettingError("eval", name, getattr(self, name), problem)

    def _parsed(self, name: str, parse) -> Any:
        value = getattr(self, name)
        if parse is not parse_size and isinstance(value, (int, float)):
            value = [value]  # one value where a list is expected (`--set eval.memory_lengths=1K`)
        try:
            return parse(value)
        except (ValueError, TypeError) as error:
            raise SettingError("eval", name, value, str(error)) from None


def settings_from_flags(args, flags: dict[str, str], **values: Any) -> EvalSettings:
    """EvalSettings from a command's arguments: `flags` maps each setting to its flag (and so
    to its argparse attribute); an invalid value is reported by its flag."""
    for name, flag in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:  # None: not given, the settings' default (or `values`) holds
            values[name] = value
    try:
        return EvalSettings(**values)
    except SettingError as error:
        flag = flags.get(error.name, error.name)
        raise ConfigError(f"{flag} {error.value!r}: {error.problem}") from None


class HeldOutDocuments:
    """Held-out documents (data specs), read when first needed: as token ids through the token
    cache (`foldformer.data.cache`, shared with training) and as their text."""

    def __init__(self, specs, tokenizer, cache_dir: str | Path | None = None, progress=True):
        self.specs, self.tokenizer = [str(s) for s in specs], tokenizer
        self.cache_dir, self.progress = cache_dir or None, progress
        self._corpus = None

    @property
    def corpus(self):
        if self._corpus is None:
            from foldformer.data.cache import tokenize_corpus

            self._corpus = tokenize_corpus(
                self.specs, self.tokenizer, self.cache_dir, progress=self.progress
            )
        return self._corpus

    def tokens(self, min_tokens: int, why: str = "") -> list[tuple[str, Any]]:
        """(name, token ids) of every document with at least min_tokens tokens (`why`: what
        needs them, for the error when none has)."""
        corpus = self.corpus
        docs = [(corpus.names[i], corpus.document(i)) for i in range(len(corpus))]
        kept = [(n, d) for n, d in docs if len(d) >= min_tokens]
        if not kept:
            longest = max((len(d) for _, d in docs), default=0)
            raise EvaluationError(
                f"no document of {self.specs} has {min_tokens:,} tokens (longest: {longest:,}){why}"
            )
        return kept

    def texts(self, max_documents: int = 0) -> list[tuple[str, str]]:
        """(name, text) of the first max_documents documents (0: all), as read from the files:
        bits per byte are defined on the text, not on a decoding of its tokens."""
        from foldformer.data.text import iter_documents

        documents = []
        for document in iter_documents(self.specs):
            documents.append((document.name, document.text))
            if max_documents and len(documents) >= max_documents:
                break
        return documents


# -- the evaluations ---------------------------------------------------------------------------


def ecl_documents(documents: HeldOutDocuments, settings: EvalSettings) -> list[tuple[str, Any]]:
    """The documents long enough for ECL's targets (an error naming the distance if none is)."""
    from foldformer.evaluate.ecl import WINDOW

    d_max = settings.ecl_max_distance
    why = (f", which ECL needs for the maximum distance {format_size(d_max)} plus the "
           f"{WINDOW}-token window: lower the maximum distance or give longer documents")  # fmt: skip
    return documents.tokens(d_max + WINDOW, why)


def run_ecl(
    model: nn.Module,
    checkpoint,
    documents: HeldOutDocuments,
    settings: EvalSettings,
    device,
    progress: bool = True,
):
    """(ECLResult, records) of effective context length on the held-out documents."""
    from foldformer.evaluate.ecl import ecl_records, evaluate_ecl

    kept = ecl_documents(documents, settings)
    result = evaluate_ecl(
        model,
        [ids for _, ids in kept],
        n_targets=settings.ecl_targets,
        max_distance=settings.ecl_max_distance,
        unit=settings.ecl_unit or None,
        batch_size=settings.ecl_batch_size,
        seed=settings.seed,
        n_boot=settings.ecl_bootstrap,
        min_gain=settings.ecl_min_gain,
        control=settings.ecl_control,
        progress=progress,
    )
    config = eval_config(model, checkpoint, task="ecl", data=documents.specs,
                         targets=settings.ecl_targets, max_distance=settings.ecl_max_distance,
                         grid_unit=result.extra["unit"], seed=settings.seed,
                         bootstrap=settings.ecl_bootstrap, min_gain=settings.ecl_min_gain,
                         control=settings.ecl_control, dtype=settings.dtype,
                         documents=[n for n, _ in kept])  # fmt: skip
    return result, ecl_records(result, config, device)


def run_passkey(model, tokenizer, checkpoint, settings: EvalSettings, device, progress=True,
                cuda_graph=False):  # fmt: skip
    """(cells, records) of passkey retrieval over the settings' lengths and depths."""
    from foldformer.evaluate.passkey import evaluate_passkey, passkey_records

    cells = evaluate_passkey(model, tokenizer, settings.passkey_lengths, settings.passkey_depths,
                             settings.passkey_samples, settings.seed, settings.passkey_batch_size,
                             progress=progress, cuda_graph=cuda_graph)  # fmt: skip
    config = eval_config(model, checkpoint, task="passkey", lengths=settings.passkey_lengths,
                         depths=settings.passkey_depths, samples=settings.passkey_samples,
                         seed=settings.seed, dtype=settings.dtype)  # fmt: skip
    return cells, passkey_records(cells, config, device)


def run_lm(model, tokenizer, checkpoint, documents: HeldOutDocuments, settings, device,
           progress=True):  # fmt: skip
    """(LMResult, records) of bits per byte on the held-out documents."""
    from foldformer.evaluate.lm import evaluate_lm, lm_records

    texts = documents.texts(settings.lm_max_documents)
    result = evaluate_lm(model, tokenizer, texts, settings.lm_max_tokens or None, progress=progress)
    config = eval_config(model, checkpoint, task="lm", data=documents.specs,
                         max_documents=settings.lm_max_documents,
                         max_tokens=settings.lm_max_tokens, dtype=settings.dtype)  # fmt: skip
    return result, lm_records(result, config, device)


def run_memory(name: str, checkpoint, settings: EvalSettings, device, progress=True):
    """(points, records) of peak memory and speed of a checkpoint against length."""
    from foldformer.evaluate.memory import bench_memory, memory_records

    spec = {"kind": "checkpoint", "name": name, "path": str(checkpoint)}
    points = bench_memory([spec], settings.memory_lengths, settings.memory_modes,
                          settings.memory_batch_size, device, progress=progress)  # fmt: skip
    params = {"batch_size": settings.memory_batch_size, "lengths": settings.memory_lengths}
    return points, memory_records(points, device, params)


def evaluate_model(
    name: str,
    checkpoint: str | Path,
    settings: EvalSettings,
    documents: HeldOutDocuments,
    device: torch.device,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The evaluations of settings.run on one checkpoint; every record named `name`."""
    records: list[dict[str, Any]] = []
    model, tokenizer = load_checkpoint(checkpoint, device, settings.dtype)
    if "ecl" in settings.run:
        result, new = run_ecl(model, checkpoint, documents, settings, device, progress)
        records += new
        low, high = result.ecl_interval
        print(f"  {name}: ECL = {result.ecl} tokens (95% interval {low}–{high})")
    if "passkey" in settings.run:
        cells, new = run_passkey(model, tokenizer, checkpoint, settings, device, progress)
        records += new
        correct, total = sum(c.correct for c in cells), sum(c.samples for c in cells)
        print(f"  {name}: passkey {correct}/{total} correct")
    if "lm" in settings.run:
        result, new = run_lm(model, tokenizer, checkpoint, documents, settings, device, progress)
        records += new
        print(f"  {name}: {result.bits_per_byte:.4f} bits per byte over {result.tokens:,} tokens")
    del model
    gc.collect()  # the memory benchmark measures from a clean baseline
    if "memory" in settings.run:
        records += run_memory(name, checkpoint, settings, device, progress)[1]
    for record in records:
        record["config"]["name"] = name
    return records


__all__ = [
    "EVALUATIONS",
    "EvalSettings",
    "HeldOutDocuments",
    "ecl_documents",
    "evaluate_model",
    "run_ecl",
    "run_lm",
    "run_memory",
    "run_passkey",
    "settings_from_flags",
]
