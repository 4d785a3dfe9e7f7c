"""`foldformer generate`: read a context (files, a saved state), then print an answer as it is
produced. The context state can be saved (--state-out) and read again (--state-in) so a long
text is condensed once and asked many questions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# A context longer than this shows a progress bar (on stderr) while it is read.
PROGRESS_TOKENS = 32768


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint, after a context of any length",
        description=__doc__,
    )
    parser.add_argument("checkpoint", help="model directory (config.json, weights, tokenizer)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text the answer continues")
    prompt.add_argument("--prompt-file", help="file holding the prompt")
    parser.add_argument("--context-file", nargs="+", default=[], metavar="F",
                        help="text files read, in order, before the prompt")  # fmt: skip
    parser.add_argument("--state-in", metavar="S", help="saved context state to start from")
    parser.add_argument("--state-out", metavar="S",
                        help="save the context state (state-in + context files, before the "
                             "prompt) here")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    parser.add_argument("--stop", nargs="+", default=[], metavar="TEXT",
                        help="text that ends the answer")  # fmt: skip
    parser.add_argument("--seed", type=int, help="same seed, same text (on one device)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fold step (long contexts on a GPU)")  # fmt: skip
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on a GPU, read contexts by replaying CUDA graphs of whole chunks "
                        "of folds: the same state, faster for small models")  # fmt: skip
    parser.set_defaults(handler=_run)


def _read_text(path: str, option: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path!r} does not exist")
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _run(args: argparse.Namespace) -> int:
    from foldformer.generate import ContextStateError

    try:
        return generate_command(args)
    except ContextStateError as error:  # a state for another model or tokenizer
        print(f"foldformer: error: {error}", file=sys.stderr)
        return 2


def generate_command(args: argparse.Namespace) -> int:
    from foldformer.config import ConfigError
    from foldformer.generate import ContextState, Engine, SamplingConfig

    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    if args.prompt is None and args.prompt_file is None and args.state_out is None:
        raise ConfigError("give --prompt or --prompt-file (or --state-out to only read a context)")
    prompt = (
        args.prompt if args.prompt_file is None else _read_text(args.prompt_file, "--prompt-file")
    )
    contexts = [_read_text(path, "--context-file") for path in args.context_file]
    from foldformer.evaluate.common import resolve_device

    device = resolve_device(args.device)  # a device this machine lacks: one line, not a crash
    engine = Engine.load(args.checkpoint, device=device, compile=args.compile,
                         cuda_graph=args.cuda_graph)  # fmt: skip
    context = None if args.state_in is None else engine.load_state(args.state_in)
    for text in contexts:
        ids = engine.tokenizer.encode(text)
        context = engine.read(ids, context, progress=len(ids) > PROGRESS_TOKENS)
    if args.state_out is not None:
        engine.save_state(args.state_out, context or ContextState())
    if prompt is None:
        return 0
    for piece in engine.stream(prompt, context, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
