"""What a run reports: metrics.jsonl, TensorBoard (tb/) and a progress bar."""

from __future__ import annotations

import json
import os
import time
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


class TrainProgress:
    """The training progress bar: in steps towards max_steps, or, when the run has a time cap
    (max_minutes), in seconds towards it, with the step in the postfix. The preset's
    max_steps=1,000,000 is "no step limit", so a bar of steps would stay near 0%."""

    def __init__(self, max_steps: int, step: int, max_seconds: float, started: float):
        from tqdm.auto import tqdm

        self.max_steps, self.timed = max_steps, max_seconds > 0
        self.started = started  # the trainer's clock, which the time cap reads
        if self.timed:  # no rate: seconds per second says nothing
            form = (
                "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]"
            )
            options = dict(total=max(1, round(max_seconds)), bar_format=form)
        else:
            options = dict(total=max_steps, initial=step, unit="step")
        self.bar = tqdm(desc="train", dynamic_ncols=True, **options)
        self.postfix: dict[str, str] = {}

    def set_postfix(self, **values: str) -> None:
        self.postfix.update(values)
        self.bar.set_postfix(self.postfix, refresh=False)

    def update(self, step: int) -> None:
        """After step `step`."""
        if not self.timed:
            self.bar.update(1)
            return
        elapsed = min(time.time() - self.started, self.bar.total)
        self.set_postfix(step=f"{step:,}/{self.max_steps:,}")  # whichever limit comes first
        self.bar.update(int(elapsed) - self.bar.n)  # whole seconds: 100% only at the cap

    def close(self) -> None:
        self.bar.close()


def progress_bar(enabled: bool, max_steps: int, step: int, max_seconds: float, started: float):
    """A `TrainProgress`, or None when the bar is off."""
    return TrainProgress(max_steps, step, max_seconds, started) if enabled else None
