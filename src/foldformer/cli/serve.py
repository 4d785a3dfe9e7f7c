"""`foldformer serve`: the session server (FastAPI on uvicorn) for one checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from foldformer.serve.limits import Limits  # not serve.app: every command builds this parser

    parser = subparsers.add_parser(
        "serve",
        help="HTTP server: sessions with saved context states, OpenAI-style completions",
        description="Serve a checkpoint over HTTP: sessions whose condensed context persists "
        "in SQLite, and /v1/completions for OpenAI clients (docs/serving.md).",
    )
    parser.add_argument("checkpoint", help="model directory or training run folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default="sessions.sqlite", help="SQLite file of the sessions")
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY "
                        "(default: $FOLDFORMER_API_KEY if set)")  # fmt: skip
    parser.add_argument("--model-name", help="the model id clients send (default: the folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on a GPU, read contexts by replaying CUDA graphs of whole chunks "
                        "of folds: the same state, faster for small models")  # fmt: skip
    for name, value in vars(Limits()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value,
                            help=f"limit (default {value})")  # fmt: skip
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        help="decode generations of different sessions that arrive within this "
        "window as one batch; 0: off (default 5 on CUDA, 0 on a CPU, where the "
        "gain depends on the load: docs/serving.md)",
    )
    parser.add_argument("--max-batch", type=int, default=32,
                        help="rows that start a batch at once (default 32)")  # fmt: skip
    parser.set_defaults(handler=_run)


def model_name(checkpoint: Path) -> str:
    """A run's folder name rather than the "final" inside it."""
    checkpoint = checkpoint.resolve()
    return checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from foldformer.config import ConfigError
    from foldformer.generate import Engine
    from foldformer.serve.app import Limits, create_app
    from foldformer.serve.batcher import Batching, default_window_ms
    from foldformer.serve.store import SessionStore

    limits = Limits(**{name: getattr(args, name) for name in vars(Limits())})
    for name, value in vars(limits).items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.batch_window_ms is not None and not 0 <= args.batch_window_ms <= 1000:
        raise ConfigError(f"--batch-window-ms must be in 0..1000, got {args.batch_window_ms}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    from foldformer.evaluate.common import resolve_device

    engine = Engine.load(args.checkpoint, device=resolve_device(args.device),
                         cuda_graph=args.cuda_graph)  # fmt: skip
    window_ms = args.batch_window_ms
    batching = Batching(default_window_ms(engine.device) if window_ms is None else window_ms,
                        args.max_batch)  # fmt: skip
    store = SessionStore(args.db)
    app = create_app(
        engine,
        store,
        args.model_name or model_name(Path(args.checkpoint)),
        limits,
        args.api_key or os.environ.get("FOLDFORMER_API_KEY"),
        batching,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
