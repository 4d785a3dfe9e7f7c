"""Cross-session batching: generations that arrive within a short window are decoded together.

Rows share a forward call where the model allows it (streams at one phase of their folds,
`Engine.stream_batch`), and each answer is the one the request gets alone: a seeded row draws
from its own generator. One decoding step of one stream leaves a GPU mostly idle (it waits on
kernel launches and on reading the weights), so B streams in one step cost about what one
does: on by default for CUDA (`default_window_ms`). Off by default on a CPU, where the gain
depends on the load (docs/serving.md: on the 2-core machine here none for 16-token answers,
whose requests are bound by HTTP, SQLite and state bytes, more for 64-token ones) while the
window adds its wait to a lone request; `--batch-window-ms 5` turns it on.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import torch

from foldformer.generate import Completion, ContextState, Engine, SamplingConfig


@dataclass
class Batching:
    """window_ms: how long the first waiting request waits for others (0: off, every request
    runs alone); max_batch: rows (prompts) that start a batch at once when reached."""

    window_ms: float = 0.0
    max_batch: int = 32


def default_window_ms(device: torch.device) -> float:
    return 5.0 if device.type == "cuda" else 0.0


@dataclass
class Job:
    """One request's prompts; `pieces` (for a streaming request) gets (index, text) as they
    come and None at the end; `done` its completions. `gone` is set when its client went away
    (`abandon`): its rows stop decoding at the next step, the rest of the batch goes on."""

    prompts: list[str]
    contexts: list[ContextState | None]
    config: SamplingConfig
    done: asyncio.Future
    pieces: asyncio.Queue | None = None
    gone: threading.Event = field(default_factory=threading.Event)

    def abandon(self) -> None:
        self.gone.set()

    async def stream(self) -> AsyncIterator[tuple[int, str]]:
        while (item := await self.pieces.get()) is not None:
            yield item


@dataclass
class Batcher:
    """Collects jobs for `batching.window_ms` (or until `max_batch` rows wait), then runs them
    as one `Engine.stream_batch` call through `work` (a worker thread). `stats` counts the rows
    of every batch and of every one-token forward call (decode step) the model ran."""

    engine: Engine
    batching: Batching
    work: Callable[..., Awaitable]
    stats: dict[str, Counter] = field(
        default_factory=lambda: {"batch_rows": Counter(), "decode_step_rows": Counter()}
    )

    def __post_init__(self) -> None:
        self._waiting: list[Job] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task] = set()
        self._lock = threading.Lock()  # the counters are updated from worker threads
        self._decoding = threading.local()  # set in the threads running this batcher's batches
        self.engine.model.register_forward_pre_hook(self._count_step)

    def _count_step(self, _module, args) -> None:
        one_token = args and args[0].dim() == 2 and args[0].shape[1] == 1
        if one_token and getattr(self._decoding, "on", False):
            with self._lock:
                self.stats["decode_step_rows"][args[0].shape[0]] += 1

    def submit(
        self,
        prompts: list[str],
        contexts: list[ContextState | None],
        config: SamplingConfig,
        stream: bool = False,
    ) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(prompts, contexts, config, loop.create_future(),
                  asyncio.Queue() if stream else None)  # fmt: skip
        self._waiting.append(job)
        rows = sum(len(j.prompts) for j in self._waiting)
        if self.batching.window_ms <= 0 or rows >= self.batching.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.batching.window_ms / 1000, self._flush)
        return job

    async def complete(
        self, prompts: list[str], contexts: list[ContextState | None], config: SamplingConfig
    ) -> list[Completion]:
        return await self.submit(prompts, contexts, config).done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, self._waiting = self._waiting, []
        if jobs:
            task = asyncio.get_running_loop().create_task(self._run(jobs))
            self._running.add(task)  # a reference, so the task is not collected midway
            task.add_done_callback(self._running.discard)

    async def _run(self, jobs: list[Job]) -> None:
        with self._lock:
            self.stats["batch_rows"][sum(len(j.prompts) for j in jobs)] += 1
        try:
            completions = await self.work(self._decode, jobs, asyncio.get_running_loop())
        except Exception as error:  # every job of the batch reports it
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(error)
                if job.pieces is not None:
                    job.pieces.put_nowait(None)
            return
        start = 0
        for job in jobs:
            if not job.done.done():  # a client that went away cancelled its future
                job.done.set_result(completions[start : start + len(job.prompts)])
            start += len(job.prompts)
            if job.pieces is not None:
                job.pieces.put_nowait(None)

    def _decode(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> list[Completion]:
        """In a worker thread: one batch of every job's rows; pieces go to the event loop. The
        rows of a job whose client went away end at the next step ("cancelled")."""
        owners = [(job, k) for job in jobs for k in range(len(job.prompts))]
        stream = self.engine.stream_batch(
            [p for job in jobs for p in job.prompts],
            [c for job in jobs for c in job.contexts],
            [job.config for job, _ in owners],
            cancelled=lambda row: owners[row][0].gone.is_set(),
        )
        self._decoding.on = True
        try:
            for row, piece in stream:
                job, k = owners[row]
                if job.pieces is not None:
                    loop.call_soon_threadsafe(job.pieces.put_nowait, (k, piece))
        finally:
            self._decoding.on = False
        return stream.completions
