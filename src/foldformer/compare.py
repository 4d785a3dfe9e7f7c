"""Baselines and peers side by side, from one command (DESIGN.md §5, §6).

    foldformer compare CONFIG.toml [--out DIR] [--models a,b,...] [--data SPEC ...]
                       [--val-data SPEC ...] [--set section.key=value ...] [--threads N]

CONFIG holds the folded model's shape (``[model]``), the models to compare (``[compare]``),
the training shared by all of them (``[train]``: same data, tokenizer, seed, steps and so the
same tokens seen), the data (``[data]``) and the evaluation settings (``[eval]``)::

    [model]                     # the folded model; every baseline keeps its shape and w
    d_model = 64
    n_layers = 2
    n_heads = 4
    segment_len = 16
    memory_len = 16

    [compare]
    models = ["folded", "no_memory", "full_attention", "transformer_xl", "rmt"]
    tolerance = 0.10            # non-embedding parameters within ±10% of the folded model

    [overrides.rmt]             # optional per-model fields, applied before matching
    memory_len = 8

    [train]                     # TrainConfig (docs/training.md)
    batch_size = 16
    seq_len = 256
    max_steps = 300

    [data]
    train = ["../shared/data/books/pg1342.txt"]
    val = ["../shared/data/books/pg35.txt"]
    tokenizer = "bytes"

    [eval]                      # foldformer.evaluate.suite.EvalSettings
    ecl_targets = 64
    passkey_lengths = [256, 1024]

For each model: its config from ``baseline_configs``, d_ff (or d_model) moved by
``match_parameters`` until its non-embedding parameter count is within the tolerance of the
folded model's (a model outside the band is refused before anything trains), training with
``train()`` into OUT/models/NAME, then ECL, passkey, bits per byte and memory/speed on
OUT/models/NAME/final. A peer whose PyPI package is missing is skipped with the reason.

``hf_folded`` and ``hf_rmt`` are Hugging Face decoders (foldformer.hf_fold) with
[overrides.NAME] fields of HFBaselineConfig: a fresh ``family`` decoder at the [model] shape,
matched like the others, or ``init_from = "path/to/hf_decoder"``, a pretrained decoder
fine-tuned under the same budget, whose fixed size is checked against the band::

    [overrides.hf_folded]
    init_from = "path/to/hf_decoder"   # [data] tokenizer: the decoder's

    [overrides.hf_rmt]
    family = "gpt2"                    # gpt2, llama (default), qwen2, qwen3

Written: OUT/results.json (every record, `foldformer report` reads it), OUT/results.md (one
table), OUT/ecl.png (loss against context, all models), OUT/memory.png (inference memory and
speed against length), OUT/training.png (loss against tokens). A re-run reuses every model that
finished (its final directory and eval.json exist, same configuration); an unfinished model is
trained again from the start, so its training time stays one uninterrupted measurement.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldformer.config import ConfigError, FoldedConfig, JsonConfig
from foldformer.evaluate.common import check_field_types
from foldformer.evaluate.suite import (
    EvalSettings,
    HeldOutDocuments,
    ecl_documents,
    evaluate_model,
)
from foldformer.hf_fold import HFBaselineConfig, decoder_shape
from foldformer.overrides import apply_overrides, field_types, read_config_file, typed
from foldformer.train import DataConfig, RunConfig, TrainConfig
from foldformer.variants.baselines import BASELINES, IN_HOUSE, config_class

# Run fields that may change between a run and its re-run without invalidating trained models.
_IGNORED_ON_RERUN = {"train": {"progress", "device"}, "data": {"cache_dir"}}


class CompareError(ValueError):
    """A comparison cannot run as configured; the message names the model and the value."""


class ParameterMismatchError(CompareError):
    """A model's non-embedding parameter count is outside the tolerance band."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class CompareSettings(JsonConfig):
    """Which models, and how strictly their sizes must match the folded model's."""

    models: list[str] = field(default_factory=lambda: list(IN_HOUSE))
    tolerance: float = 0.10  # relative band of non-embedding parameters around the folded model
    match_parameters: bool = True  # False: take each config as given, still check the band

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            self.models = [m for m in self.models.split(",") if m]
        check_field_types(self, "compare")
        unknown = [m for m in self.models if m not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown model(s) {unknown} in [compare] models; known: "
                              f"{list(BASELINES)}")  # fmt: skip
        if not self.models:
            raise ConfigError("[compare] models is empty: list at least one model")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"[compare] models lists a model twice: {self.models}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance must be in (0, 1), got {self.tolerance!r}")


SECTIONS = ("model", "compare", "overrides", "train", "data", "eval")


@dataclass
class CompareConfig:
    """A whole comparison: base shape, models, per-model overrides, training, data, eval."""

    model: dict[str, Any]
    compare: CompareSettings
    train: TrainConfig
    data: DataConfig
    eval: EvalSettings
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        model_type = self.model.pop("model_type", "folded")
        if model_type != "folded":
            raise ConfigError(
                f"[model] is the folded model every baseline is built from; model_type must be "
                f"'folded', got {model_type!r} (list baselines in [compare] models)"
            )
        self.model = typed(FoldedConfig, self.model, "model")  # `memory_gate = "no"` is False
        FoldedConfig.from_dict(self.model)  # a misspelt or invalid shape field, named now
        for name, fields in self.overrides.items():
            if name not in BASELINES:
                raise ConfigError(f"[overrides.{name}] names no model; known: {list(BASELINES)}")
            cls = config_class(BASELINES[name][0])
            self.overrides[name] = typed(cls, fields, f"overrides.{name}")
            unknown = sorted(set(fields) - set(field_types(cls)))
            if unknown:  # else dropped when the baseline's config is built: silently not applied
                raise ConfigError(
                    f"[overrides.{name}] sets {unknown}, not fields of {cls.__name__} "
                    f"(model {name!r})"
                )
            # a pretrained decoder's own family and shape would silently replace these
            pretrained = sorted(set(fields) & set(HFBaselineConfig.PRETRAINED))
            if cls is HFBaselineConfig and fields.get("init_from") and pretrained:
                raise ConfigError(
                    f"[overrides.{name}] sets {pretrained} next to init_from="
                    f"{fields['init_from']!r}: a pretrained decoder brings its own"
                )
        if {"ecl", "lm"} & set(self.eval.run) and not self.data.val:
            raise CompareError(
                f"[eval] run {self.eval.run} reads held-out text: give [data] val (or --val-data)"
            )
        if self.train.max_minutes:
            raise ConfigError(
                f"train.max_minutes={self.train.max_minutes}: a comparison gives every model the "
                "same token budget; set train.max_steps instead"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "compare": self.compare.to_dict(),
            "overrides": {k: dict(v) for k, v in self.overrides.items()},
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
            "eval": self.eval.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareConfig:
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections: {list(SECTIONS)}")
        for name, fields in values.get("overrides", {}).items():
            if not isinstance(fields, dict):
                raise ConfigError(f"[overrides.{name}] must be a table of fields, got {fields!r}")
        return cls(
            model=dict(values.get("model", {})),
            compare=CompareSettings.from_dict(values.get("compare", {})),
            train=TrainConfig.from_dict(values.get("train", {})),
            data=DataConfig.from_dict(values.get("data", {})),
            eval=EvalSettings.from_dict(values.get("eval", {})),
            overrides={k: dict(v) for k, v in values.get("overrides", {}).items()},
        )


def compare_sections() -> dict[str, type]:
    """The dataclass of each section, for overrides: the folded model's fields in [model], and
    each model's own config class in [overrides.NAME]."""
    sections = {"model": FoldedConfig, "compare": CompareSettings, "train": TrainConfig,
                "data": DataConfig, "eval": EvalSettings}  # fmt: skip
    for name, (model_type, _) in BASELINES.items():
        sections[f"overrides.{name}"] = config_class(model_type)
    return sections


def load_compare_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> CompareConfig:
    """The TOML (or JSON) file, then `section.key=value` overrides (`overrides.rmt.memory_len`
    for a per-model field), parsed by the field's type as `train` parses its options
    (foldformer.overrides); [compare] and [eval] parse their own values ("4K" sizes)."""
    values: dict[str, Any] = {section: {} for section in SECTIONS}
    if path is not None:
        for section, fields in read_config_file(path).items():
            if section not in values:
                raise ConfigError(f"unknown section [{section}] in {path}; sections: {SECTIONS}")
            values[section].update(fields)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if "." not in key:  # a comparison has five sections: a bare name would be a guess
            raise ConfigError(
                f"override {key!r} is not section.key (sections: {', '.join(SECTIONS)}; "
                "per model: overrides.NAME.key)"
            )
        if key in ("data.train", "data.val") and isinstance(value, str):
            overrides[key] = [value]  # one data spec: a spec may hold commas (?authors=a,b)
    apply_overrides(values, overrides, compare_sections(), as_given=("compare", "eval"))
    return CompareConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# Matching sizes
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """One model of the comparison: its config and size, or why it is skipped."""

    name: str
    model_type: str
    values: dict[str, Any]  # config fields without model_type
    parameters: int | None = None  # non-embedding
    ratio: float | None = None  # parameters / the folded model's
    skipped: str | None = None  # the reason, when the model cannot run here

    def run_model_dict(self) -> dict[str, Any]:
        """The model config training gets (a Hugging Face type's: its decoder's)."""
        from foldformer.variants.baselines import model_values

        return {"model_type": self.model_type, **model_values(self.model_type, self.values)}


def check_parameter_band(
    name: str, count: int, target: int, tolerance: float, remedy: str | None = None
) -> float:
    """The ratio count / target; ParameterMismatchError when it is outside 1 ± tolerance.
    remedy: what to change (default: the model's overrides, or matching)."""
    ratio = count / target
    if not 1 - tolerance <= ratio <= 1 + tolerance:
        remedy = remedy or (
            f"change its [overrides.{name}] or let [compare] match_parameters adjust d_ff"
        )
        raise ParameterMismatchError(
            f"model {name!r} has {count:,} non-embedding parameters, {ratio:.3f}× the folded "
            f"model's {target:,}: outside the ±{tolerance:.0%} band a comparison requires "
            f"({remedy})"
        )
    return ratio


def plan_models(config: CompareConfig, vocab_size: int) -> tuple[int, list[ModelPlan]]:
    """(the folded model's non-embedding parameter count, one plan per listed model).

    Raises ParameterMismatchError for a model that cannot be brought within the band: nothing
    should train when the comparison would not be at matched size.
    """

    base = {"vocab_size": vocab_size, **config.model}
    names = list(config.compare.models)
    with _quiet_peer_logs():
        return _plan_models(config, base, names)


@contextlib.contextmanager
def _quiet_peer_logs():
    """x-transformers logs a warning (through loguru) for every model it builds; matching
    builds dozens on the meta device."""
    try:
        from loguru import logger
    except ImportError:
        yield
        return
    logger.disable("x_transformers")
    try:
        yield
    finally:
        logger.enable("x_transformers")


def _plan_models(config: CompareConfig, base: dict[str, Any], names: list[str]):
    from foldformer.variants.baselines import (
        baseline_configs,
        config_values,
        count_parameters,
        match_parameters,
    )
    from foldformer.variants.peers import PeerUnavailableError

    configs = baseline_configs(base, names=sorted(set(names) | {"folded"}, key=names_order))
    folded = {**configs["folded"], **config.overrides.get("folded", {})}
    target = count_parameters("folded", config_values(folded))
    tolerance = config.compare.tolerance
    plans = []
    for name in names:
        entry = {**configs[name], **config.overrides.get(name, {})}
        model_type = entry.pop("model_type")
        plan = ModelPlan(name, model_type, entry)
        pretrained = entry.get("init_from")  # a Hugging Face checkpoint: its size is its own
        remedy = None
        if pretrained:
            remedy = (f"init_from={pretrained!r} is a pretrained decoder of fixed size: give "
                      "[model] a shape of its size")  # fmt: skip
        try:
            if name == "folded" or pretrained or not config.compare.match_parameters:
                try:
                    if pretrained:  # its family and shape are the checkpoint's
                        plan.values = config_class(model_type).from_dict(entry).to_dict()
                    plan.parameters = count_parameters(model_type, plan.values)
                except ConfigError as error:  # e.g. a decoder vocabulary below the tokenizer's
                    raise ConfigError(f"model {name!r}: {error}") from error
            else:
                try:
                    plan.values, plan.parameters = match_parameters(
                        model_type, entry, target, tolerance
                    )
                except PeerUnavailableError:
                    raise
                except ValueError as error:
                    raise ParameterMismatchError(f"model {name!r}: {error}") from error
        except PeerUnavailableError as error:
            plan.skipped = str(error)
            plans.append(plan)
            continue
        plan.ratio = check_parameter_band(name, plan.parameters, target, tolerance, remedy)
        plans.append(plan)
    return target, plans


def names_order(name: str) -> int:
    """Position of a model name in the table order of BASELINES."""
    return list(BASELINES).index(name)


def print_plans(target: int, plans: list[ModelPlan], tolerance: float) -> None:
    print(f"non-embedding parameters, matched to the folded model's {target:,} (±{tolerance:.0%}):")
    for p in plans:
        if p.skipped:
            print(f"  {p.name:<22} skipped: {p.skipped}")
            continue
        shape = f"d_model={p.values.get('d_model')} d_ff={p.values.get('d_ff')}"
        shape += f" w={p.values.get('segment_len')} m={p.values.get('memory_len')}"
        print(f"  {p.name:<22} {p.parameters:>12,}  ratio {p.ratio:.3f}  ({shape})")


# ---------------------------------------------------------------------------------------------
# One model: train (or reuse); its evaluation is the suite's (foldformer.evaluate.suite)
# ---------------------------------------------------------------------------------------------


def _comparable(run: dict[str, Any]) -> dict[str, Any]:
    run = json.loads(json.dumps(run))  # tuples -> lists, as read back from JSON
    for section, names in _IGNORED_ON_RERUN.items():
        for name in names:
            run.get(section, {}).pop(name, None)
    return run


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def train_model(plan: ModelPlan, config: CompareConfig, model_dir: Path) -> dict[str, Any]:
    """Train (or reuse) one model; returns its state: run config, summary, train seconds."""
    from foldformer.train import train

    run = RunConfig(model=plan.run_model_dict(), train=config.train, data=config.data)
    state_path = model_dir / "compare_state.json"
    state = _read_json(state_path)
    if state is not None and (model_dir / "final" / "config.json").is_file():
        changes = _differences(_comparable(state["run"]), _comparable(run.to_dict()))
        if changes:
            raise CompareError(
                f"{model_dir} was trained with another configuration ({'; '.join(changes[:5])}); "
                "write to another --out, or delete that folder to train it again"
            )
        print(f"  {plan.name}: already trained in {model_dir}, reused")
        return state
    if model_dir.exists():
        if not (model_dir / "run_config.json").is_file():
            raise CompareError(f"{model_dir} exists and is not a training run: move it away")
        print(f"  {plan.name}: unfinished run in {model_dir}, training it again from the start")
        shutil.rmtree(model_dir)
    started = time.perf_counter()
    summary = train(run, model_dir)
    state = {
        "run": run.to_dict(),
        "summary": summary,
        "train_seconds": time.perf_counter() - started,
    }
    _write_json(state_path, state)
    return state


def training_records(
    plan: ModelPlan, target: int, state: dict[str, Any], tolerance: float, device
) -> list[dict[str, Any]]:
    """Size, tokens seen, time and final losses of one trained model, as result records."""
    from foldformer.evaluate.records import make_record

    summary = state["summary"]
    config = {"name": plan.name, "model": plan.run_model_dict(), "train": state["run"]["train"],
              "data": state["run"]["data"]}  # fmt: skip
    size_extra = {"folded_parameters": target, "ratio": plan.ratio, "tolerance": tolerance}
    return [
        make_record("non_embedding_parameters", plan.parameters, None, config, size_extra, device),
        make_record(
            "tokens_seen", summary["tokens"], None, config, {"steps": summary["steps"]}, device
        ),  # fmt: skip
        make_record(
            "train_seconds",
            state["train_seconds"],
            None,
            config,
            {"definition": "wall time of train(), data caching included"},
            device,
        ),  # fmt: skip
        make_record(
            "final_train_loss",
            summary["final_train_loss"],
            None,
            config,
            {"unit": "nats/token", "definition": "mean over the last log step"},
            device,
        ),  # fmt: skip
        make_record(
            "final_val_loss",
            summary["final_val_loss"],
            None,
            config,
            {"unit": "nats/token", "definition": "train(): eval_batches of the val streams"},
            device,
        ),  # fmt: skip
    ]


# ---------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------


def cpu_model_name() -> str:
    """The CPU's model name (as lscpu prints it), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_comparison(
    config: CompareConfig,
    out_dir: str | Path,
    command: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every model of `config`; write results.json, results.md and plots.

    Returns every record written to OUT/results.json.
    """
    from foldformer.data.tokenizers import load_tokenizer
    from foldformer.evaluate.common import resolve_device
    from foldformer.evaluate.records import load_records, write_records
    from foldformer.train import setup_distributed
    from foldformer.train.trainer import check_writable

    out_dir = check_writable(Path(out_dir))  # before the corpus is tokenized
    resolve_device(config.train.device, "train.device ")  # one line for a device not here
    _, world_size, device = setup_distributed(config.train.device)
    if world_size > 1:
        raise CompareError("run compare as one process (it trains models one after another)")
    device = resolve_device(str(device))
    if not config.eval.ecl_unit:  # one distance grid for every model: the folded model's w
        config.eval.ecl_unit = int(config.model.get("segment_len", 8))
    tokenizer = load_tokenizer(config.data.tokenizer)
    target, plans = plan_models(config, tokenizer.vocab_size)
    print_plans(target, plans, config.compare.tolerance)
    _warm_token_cache(config, tokenizer, progress)
    val = HeldOutDocuments(config.data.val, tokenizer, config.data.cache_dir, progress)
    if "ecl" in config.eval.run:
        ecl_documents(val, config.eval)  # documents too short fail before any model trains

    runnable = [p for p in plans if not p.skipped]
    writer = ResultsWriter(config, plans, target, command, device, out_dir)
    if not runnable:
        writer.write(final=True)
    for i, plan in enumerate(runnable, 1):
        model_dir = out_dir / "models" / plan.name
        print(f"[{i}/{len(runnable)}] {plan.name} ({plan.model_type}, {plan.parameters:,} "
              f"non-embedding parameters, ratio {plan.ratio:.3f})", flush=True)  # fmt: skip
        state = train_model(plan, config, model_dir)
        summary = state["summary"]
        print(f"  {plan.name}: {summary['tokens']:,} tokens in {state['train_seconds']:.1f} s, "
              f"final val loss {_num(summary['final_val_loss'])}", flush=True)  # fmt: skip
        eval_path = model_dir / "eval.json"
        eval_settings = config.eval.to_dict()
        if eval_path.is_file() and state.get("eval") == eval_settings:
            print(f"  {plan.name}: evaluations already in {eval_path}, reused")
            records = load_records([eval_path])
        else:
            records = evaluate_model(plan.name, model_dir / "final", config.eval, val, device,
                                     progress)  # fmt: skip
            write_records(records, eval_path)
            state["eval"] = eval_settings
            _write_json(model_dir / "compare_state.json", state)
        tolerance = config.compare.tolerance
        writer.model_records += training_records(plan, target, state, tolerance, device)
        writer.model_records += records
        writer.write(final=i == len(runnable))
    return writer.records


class ResultsWriter:
    """results.json and results.md from the records so far, rewritten after every model (so an
    interrupted comparison keeps what it finished); the plots once all models are done."""

    def __init__(self, config, plans, target, command, device, out_dir: Path):
        from foldformer.evaluate.records import make_record

        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        runnable = [p.name for p in plans if not p.skipped]
        self.header = make_record(
            "comparison",
            len(runnable),
            None,
            {"name": "comparison", **config.to_dict()},
            {
                "command": command,
                "models": runnable,
                "skipped": {p.name: p.skipped for p in plans if p.skipped},
                "folded_parameters": target,
                "seed": config.train.seed,
                "cpu_model": cpu_model_name(),
                "tokens_per_model": config.train.max_steps
                * config.train.batch_size
                * config.train.seq_len,
            },
            device,
        )
        self.skipped = [
            make_record("model_skipped", plan.skipped, None,
                        {"name": plan.name, "model_type": plan.model_type},
                        {"reason": plan.skipped}, device)
            for plan in plans if plan.skipped
        ]  # fmt: skip
        self.model_records: list[dict[str, Any]] = []

    @property
    def records(self) -> list[dict[str, Any]]:
        return [self.header, *self.model_records, *self.skipped]

    def write(self, final: bool) -> None:
        from foldformer.evaluate.records import write_records

        records, out_dir = self.records, self.out_dir
        write_records(records, out_dir / "results.json")
        (out_dir / "results.md").write_text(results_markdown(records) + "\n")
        if not final:
            return
        plots = plot_results(records, out_dir)
        print(results_table(records))
        print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and "
              f"{', '.join(str(p) for p in plots)}")  # fmt: skip


def _warm_token_cache(config: CompareConfig, tokenizer, progress: bool) -> None:
    """Tokenize the text corpora once, before the first model's clock starts."""
    from foldformer.data.cache import tokenize_corpus
    from foldformer.data.sources import TASK_PREFIXES

    for specs in (config.data.train, config.data.val):
        specs = [s for s in specs if not str(s).startswith(TASK_PREFIXES)]
        if specs:
            tokenize_corpus(specs, tokenizer, config.data.cache_dir or None, progress=progress)


# ---------------------------------------------------------------------------------------------
# Table and plots, from the records alone (so they can be remade from results.json)
# ---------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"


def _by_model(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        name = r["config"].get("name")
        if name and r["metric"] != "comparison":
            grouped.setdefault(name, []).append(r)
    return grouped


def _one(records: list[dict[str, Any]], metric: str, **eval_match: Any) -> dict[str, Any] | None:
    for r in records:
        if r["metric"] != metric:
            continue
        params = r["config"].get("eval", {})
        if all(params.get(k) == v for k, v in eval_match.items()):
            return r
    return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def _interval(record: dict[str, Any], pattern: str) -> str:
    interval = record.get("interval")
    return "" if not interval else " " + pattern.format(*interval)


def results_table(records: list[dict[str, Any]]) -> str:
    """One Markdown table, one row per model (skipped models say why)."""
    from foldformer.evaluate.common import format_size

    grouped = _by_model(records)
    lengths = sorted({r["config"]["eval"]["length"] for r in records
                      if r["metric"] == "passkey_accuracy"})  # fmt: skip
    memory = [r for r in records if r["metric"] == "peak_memory_mib"
              and r["config"]["eval"].get("mode") == "inference"]  # fmt: skip
    t_max = max((r["config"]["eval"]["length"] for r in memory), default=None)
    t_text = format_size(t_max) if t_max else "–"
    gains = [r for r in records if r["metric"] == "context_content_gain"]
    d_max = max((r["config"]["eval"]["distance"] for r in gains), default=None)
    header = (["model", "non-emb. params (× folded)", "tokens seen", "train time",
               "final val loss", "LM bits/byte [95%]", "ECL [95%]"]
              + ([f"content gain at {format_size(d_max)} [95%]"] if gains else [])
              + [f"passkey {format_size(n)}" for n in lengths]
              + [f"inference peak MiB at {t_text} (over baseline)", f"tokens/s at {t_text}"])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "| --- " + "| ---: " * (len(header) - 1) + "|"]
    for name, rs in sorted(grouped.items(), key=lambda kv: names_order(kv[0])
                           if kv[0] in BASELINES else len(BASELINES)):  # fmt: skip
        skipped = _one(rs, "model_skipped")
        if skipped:
            reason = str(skipped["value"]).split(". ")[0]
            lines.append(f"| {name} | skipped: {reason} |" + " |" * (len(header) - 2))
            continue
        params = _one(rs, "non_embedding_parameters")
        tokens = _one(rs, "tokens_seen")
        seconds = _one(rs, "train_seconds")
        val_loss = _one(rs, "final_val_loss")
        bpb = _one(rs, "bits_per_byte")
        ecl = _one(rs, "ecl")
        row = [
            name,
            "–" if not params else f"{params['value']:,} ({params['extra']['ratio']:.3f})",
            "–" if not tokens else f"{tokens['value']:,}",
            _duration(seconds["value"] if seconds else None),
            _num(val_loss["value"] if val_loss else None),
            "–" if not bpb else f"{bpb['value']:.3f}" + _interval(bpb, "[{:.3f}, {:.3f}]"),
            "–" if not ecl else f"{ecl['value']}" + _interval(ecl, "[{}–{}]"),
        ]
        if gains:
            gain = _one(rs, "context_content_gain", distance=d_max)
            row.append("–" if not gain else f"{gain['value']:+.4f}"
                       + _interval(gain, "[{:+.4f}, {:+.4f}]"))  # fmt: skip
        for n in lengths:
            cells = [r for r in rs if r["metric"] == "passkey_accuracy"
                     and r["config"]["eval"]["length"] == n]  # fmt: skip
            correct = sum(c["extra"]["correct"] for c in cells)
            total = sum(c["extra"]["samples"] for c in cells)
            row.append(f"{correct / total:.0%} ({correct}/{total})" if total else "–")
        peak = _one(rs, "peak_memory_mib", mode="inference", length=t_max)
        work = _one(rs, "work_memory_mib", mode="inference", length=t_max)
        speed = _one(rs, "tokens_per_second", mode="inference", length=t_max)
        row.append("–" if not peak else f"{peak['value']:.1f} ({work['value']:.1f})")
        row.append("–" if not speed else f"{speed['value']:,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def shapes_table(records: list[dict[str, Any]]) -> str:
    """Each trained model's type and the shape fields parameter matching may have moved."""
    lines = ["| model | model_type | d_model | d_ff | n_layers | n_heads | w | m |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in records:
        if r["metric"] != "non_embedding_parameters":
            continue
        m = r["config"]["model"]
        if "hf_config" in m:  # a Hugging Face decoder: its shape is in its own config
            m = {**m, **decoder_shape(m["hf_config"])}
        w = m.get("segment_len")
        w_text = "∞ (one segment)" if isinstance(w, int) and w >= 10**9 else str(w)
        lines.append(
            f"| {r['config']['name']} | {m.get('model_type')} | {m.get('d_model')} | "
            f"{m.get('d_ff')} | {m.get('n_layers')} | {m.get('n_heads')} | {w_text} | "
            f"{m.get('memory_len')} |"
        )
    return "\n".join(lines)


def results_markdown(records: list[dict[str, Any]]) -> str:
    """results.md: what was run, where, when, and the table."""
    header = next((r for r in records if r["metric"] == "comparison"), None)
    lines = ["# Comparison", ""]
    if header:
        hw, extra, code = header["hardware"], header["extra"], header["code_version"]
        train = header["config"]["train"]
        device = hw.get("device_name") if hw.get("device", "").startswith("cuda") else (
            f"{extra.get('cpu_model')} ({hw.get('cpu_count')} CPUs, "
            f"torch on {hw.get('torch_threads')} thread(s))")  # fmt: skip
        commit = (code.get("git_commit") or "unknown")[:12]
        dirty = " (uncommitted changes)" if code.get("git_dirty") else ""
        lines += [
            f"- command: `{extra.get('command') or 'foldformer compare'}`",
            f"- hardware: {hw.get('device')}, {device}; torch {hw.get('torch')}",
            f"- date: {header['date']}",
            f"- code: foldformer {code.get('package')}, commit {commit}{dirty}",
            f"- seed {extra.get('seed')}; every model: {train['max_steps']} steps × "
            f"{train['batch_size']} rows × {train['seq_len']} tokens = "
            f"{extra.get('tokens_per_model'):,} tokens, tokenizer "
            f"{header['config']['data']['tokenizer']}",
            f"- training data: {', '.join(header['config']['data']['train'])}",
            f"- validation data: {', '.join(header['config']['data']['val'])}",
            f"- folded model: {extra.get('folded_parameters'):,} non-embedding parameters; "
            f"others matched within ±{header['config']['compare']['tolerance']:.0%}",
            "",
        ]
    lines.append(results_table(records))
    lines += [
        "",
        "Columns: loss in nats/token; LM bits per byte on the validation documents (bootstrap "
        "over documents); ECL in tokens with its bootstrap interval (DESIGN.md §6); passkey "
        "accuracy over all depths at each prompt length; peak memory of streaming inference "
        "(CPU: process RSS, CUDA: allocated) and, in brackets, its rise over the memory before "
        "the work. All records: results.json (`foldformer report results.json`).",
        "",
        "Shapes after parameter matching (w = segment length, m = memory size):",
        "",
        shapes_table(records),
    ]
    return "\n".join(lines)


def plot_results(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """ecl.png (loss against context, every model), memory.png (inference memory and speed
    against length), training.png (loss against tokens, where the training logs exist)."""
    from foldformer.evaluate.common import new_figure, save_figure

    grouped = _by_model(records)
    written = []
    ecl = {n: _one(rs, "ecl") for n, rs in grouped.items() if _one(rs, "ecl")}
    if ecl:
        fig, ax = new_figure(figsize=(9, 4.5))
        units = []
        for name, r in ecl.items():
            curve = r["extra"]["curve"]
            d = [p["distance"] for p in curve]
            loss = [p["loss"] for p in curve]
            err = [[p["loss"] - p["loss_interval"][0] for p in curve],
                   [p["loss_interval"][1] - p["loss"] for p in curve]]  # fmt: skip
            ax.errorbar(
                d, loss, yerr=err, marker="o", capsize=2, label=f"{name} (ECL {r['value']})"
            )
            units.append(r["extra"].get("grid_unit") or (d[1] if len(d) > 1 else 1))
        ax.set_xscale("symlog", linthresh=min(units))
        ticks = sorted({p["distance"] for r in ecl.values() for p in r["extra"]["curve"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context tokens before the 64-token target window (d)")
        ax.set_ylabel("loss on the target window (nats/token)")
        ax.set_title("loss against context on held-out text (bars: 95% over targets)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        written.append(save_figure(fig, out_dir / "ecl.png"))
    memory_metrics = ("work_memory_mib", "tokens_per_second")
    if any(r["metric"] in memory_metrics for r in records):
        fig, (left, right) = new_figure(1, 2, figsize=(11, 4.5))
        for name, rs in grouped.items():
            for mode, style in (("inference", "-"), ("training", "--")):
                for ax, metric in zip((left, right), memory_metrics, strict=True):
                    points = sorted((r["config"]["eval"]["length"], max(r["value"], 1e-3))
                                    for r in rs if r["metric"] == metric
                                    and r["config"]["eval"].get("mode") == mode)  # fmt: skip
                    if points:
                        ax.plot(*zip(*points, strict=True), style, marker="o",
                                label=f"{name} {mode}")  # fmt: skip
        labels = ("peak memory over the baseline before the work (MiB)", "tokens/s")
        for ax, label in zip((left, right), labels, strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
        left.legend(fontsize=7)
        left.set_title("memory against length")
        right.set_title("speed against length")
        written.append(save_figure(fig, out_dir / "memory.png"))
    logs = {n: out_dir / "models" / n / "metrics.jsonl" for n in grouped}
    logs = {n: p for n, p in logs.items() if p.is_file()}
    if logs:
        fig, ax = new_figure(figsize=(9, 4.5))
        late = []  # losses after the first fifth of training set the y range
        for name, path in logs.items():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
            val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
            if not train:
                continue
            (line,) = ax.plot(*zip(*train, strict=True), alpha=0.6, label=f"{name} train")
            if val:
                ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(),
                        label=f"{name} val")  # fmt: skip
            horizon = 0.2 * train[-1][0]
            late += [loss for t, loss in train + val if t >= horizon]
        if late:
            ax.set_ylim(min(late) - 0.05, max(late) + 0.05)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("training loss (lines) and validation loss (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
        written.append(save_figure(fig, out_dir / "training.png"))
    return written


__all__ = [
    "CompareConfig",
    "CompareError",
    "CompareSettings",
    "EvalSettings",
    "ModelPlan",
    "ParameterMismatchError",
    "check_parameter_band",
    "load_compare_config",
    "plan_models",
    "results_markdown",
    "results_table",
    "run_comparison",
]
