"""What a run reports: metrics.jsonl, TensorBoard (tb/) and a progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records up to `step` (a resumed run logs the later ones again), and drop a
    line a kill cut short; returns the records kept."""
    if not path.is_file():
        return []
    kept, records = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
            records.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return records


class MetricLogger:
    """Metrics to out_dir/metrics.jsonl and TensorBoard (out_dir/tb). A run resumed at
    `resume_step` keeps the records up to it, so each step is recorded once."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.last: dict[str, Any] = {}
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:  # the summary's last loss, should no step follow
            for record in truncate_metrics(out_dir / "metrics.jsonl", resume_step):
                self.last.update(record)
        self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge)
        except ImportError:  # tensorboard is a dependency; tolerate its absence anyway
            self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        self.last.update(record)
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def progress_bar(enabled: bool, total: int, step: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
