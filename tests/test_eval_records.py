"""The result record format and the Markdown report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from foldformer.evaluate.records import (
    load_records,
    make_record,
    records_to_markdown,
    report_command,
    validate_record,
    write_records,
)


def test_record_round_trip_and_report(tmp_path, capsys):
    import numpy as np
    import torch

    records = [
        make_record(
            "ecl",
            96,
            interval=(np.int64(48), 192),
            config={"checkpoint": str(tmp_path / "run1"), "eval": {"targets": 64, "w": 12}},
            extra={"curve": torch.tensor([1.5, float("nan")])},
        ),
        make_record("bits_per_byte", 1.2345678, config={"name": "tiny"}),
    ]
    path = write_records(records, tmp_path / "out" / "r.json")
    loaded = json.loads(path.read_text())
    assert loaded == load_records([tmp_path / "out"])
    assert loaded[0]["interval"] == [48, 192]
    assert loaded[0]["extra"]["curve"] == [1.5, None]  # NaN is not JSON: stored as null
    assert loaded[0]["code_version"]["package"]
    assert loaded[0]["hardware"]["cpu_count"] >= 1
    table = records_to_markdown(loaded).splitlines()
    assert table[2].startswith("| ecl | 96 | [48, 192] | run1 | targets=64, w=12 |")
    assert table[3].startswith("| bits_per_byte | 1.235 | – | tiny |")
    report_command(SimpleNamespace(results=[str(path)], metric=["ecl"], out=None))
    assert "| ecl |" in capsys.readouterr().out


def test_invalid_records_are_rejected_by_name(tmp_path):
    good = make_record("x", 1)
    with pytest.raises(ValueError, match="lacks keys"):
        validate_record({"metric": "x", "value": 1})
    with pytest.raises(ValueError, match="interval"):
        validate_record({**good, "interval": [1]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_records([bad])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_records([tmp_path / "missing"])
