"""One JSON record format for every result the project reports (DESIGN.md §6).

A record is a flat dict::

    {"metric": "ecl", "value": 96, "interval": [48, 192] or null,
     "config": {"model": {...model config...}, "checkpoint": "...", "eval": {...eval params...}},
     "code_version": {"package": "0.1.0", "git_commit": "...", "git_dirty": false},
     "hardware": {"device": "cpu", "device_name": "...", "cpu_count": 2, "torch": "2.13.0"},
     "date": "2025-01-01T12:00:00+00:00", "extra": {...curves, per-cell numbers...}}

A results file holds a JSON list of records. `foldformer report FILES...` prints them as one
Markdown table.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from foldformer import __version__
from foldformer.config import ConfigError

RECORD_KEYS = ("metric", "value", "interval", "config", "code_version", "hardware", "date", "extra")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version, plus the git commit (and whether the tree is dirty) when available."""
    version: dict[str, Any] = {"package": __version__, "git_commit": None, "git_dirty": None}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            )
            version["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (installed package) or no git binary
    return version


def hardware(device: str | torch.device | None = None) -> dict[str, Any]:
    """The machine a result was measured on."""
    device = torch.device(device or "cpu")
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["device_name"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
        info["device_count"] = torch.cuda.device_count()
    return info


def _jsonable(value: Any) -> Any:
    """Tensors, numpy scalars, paths and tuples as plain JSON values; NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config as a dict, with its class and parameter counts."""
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config or {}))
    values["class"] = type(model).__name__
    values["parameters"] = sum(p.numel() for p in model.parameters())
    if hasattr(model, "num_parameters"):
        values["non_embedding_parameters"] = model.num_parameters(non_embedding=True)
    return values


def make_record(
    metric: str,
    value: Any,
    interval: Sequence[float] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """A result record; code version, hardware and date are filled in here."""
    if interval is not None and len(interval) != 2:
        raise ValueError(f"interval must be (low, high), got {interval!r}")
    record = {
        "metric": metric,
        "value": value,
        "interval": None if interval is None else list(interval),
        "config": config or {},
        "code_version": code_version(),
        "hardware": hardware(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    return _jsonable(record)


def validate_record(record: Any) -> None:
    """Raise ValueError naming what is wrong if `record` is not a result record."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"record for {record.get('metric')!r} lacks keys {missing}")
    if not isinstance(record["metric"], str) or not record["metric"]:
        raise ValueError(f"record metric must be a non-empty string, got {record['metric']!r}")
    interval = record["interval"]
    if interval is not None and (not isinstance(interval, list) or len(interval) != 2):
        raise ValueError(f"record interval must be null or [low, high], got {interval!r}")
    for key in ("config", "code_version", "hardware", "extra"):
        if not isinstance(record[key], dict):
            raise ValueError(f"record {key} must be an object, got {record[key]!r}")
    _dt.datetime.fromisoformat(record["date"])


def write_records(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Validate and write records as a JSON list (parent folders created). Returns the path."""
    records = [_jsonable(r) for r in records]
    for record in records:
        validate_record(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


class RecordError(ConfigError):
    """A results file is not JSON or not a valid record (the message names the file)."""


def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Records from JSON files (a list or a single record each) or folders of them."""
    records: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = sorted(path.rglob("*.json"))
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"no results file or folder at {path}")
        for file in files:
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as error:
                raise RecordError(f"{file} is not valid JSON: {error}") from None
            items = data if isinstance(data, list) else [data]
            for item in items:
                try:
                    validate_record(item)
                except ValueError as error:
                    raise RecordError(f"{file}: {error}") from None
                records.append(item)
    return records


# -- Markdown report ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def _model_name(record: dict[str, Any]) -> str:
    config = record.get("config", {})
    if config.get("name"):
        return str(config["name"])
    if config.get("checkpoint"):
        return Path(str(config["checkpoint"])).name or str(config["checkpoint"])
    model = config.get("model", {})
    if model:
        return f"{model.get('class', 'model')} w={model.get('segment_len')} m={model.get('memory_len')}"
    return "–"


def _params(record: dict[str, Any]) -> str:
    params = record.get("config", {}).get("eval", {})
    shown = [f"{k}={_fmt(v)}" for k, v in params.items() if not isinstance(v, (list, dict))]
    return ", ".join(shown) if shown else "–"


def records_to_markdown(records: Sequence[dict[str, Any]]) -> str:
    """One row per record: metric, value, 95% interval, model, eval parameters, commit, date."""
    header = "| metric | value | 95% interval | model | parameters | commit | date |"
    lines = [header, "| --- | ---: | --- | --- | --- | --- | --- |"]
    for r in records:
        interval = r.get("interval")
        interval_text = "–" if not interval else f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"
        commit = (r.get("code_version", {}).get("git_commit") or "")[:8] or "–"
        lines.append(
            f"| {r['metric']} | {_fmt(r['value'])} | {interval_text} | {_model_name(r)} | "
            f"{_params(r)} | {commit} | {str(r.get('date', ''))[:10]} |"
        )
    return "\n".join(lines)


def report_command(args) -> int:
    """`foldformer report RESULTS...`: print (or write) a Markdown table of the records."""
    records = load_records(args.results)
    if args.metric:
        records = [r for r in records if r["metric"] in set(args.metric)]
    table = records_to_markdown(records)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        print(f"wrote {len(records)} records to {args.out}")
    else:
        print(table)
    return 0


__all__ = [
    "code_version",
    "hardware",
    "load_records",
    "make_record",
    "model_config",
    "records_to_markdown",
    "validate_record",
    "write_records",
]
