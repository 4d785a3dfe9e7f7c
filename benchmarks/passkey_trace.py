"""Follow passkeys through the folds of one long prompt (issue 13 item 1, docs/retrieval.md).

    PYTHONPATH=src python benchmarks/passkey_trace.py MODEL_DIR --out OUT.json \\
        [--keys 8] [--max-tokens 1M] [--trained 8K]

K prompts that differ only in their key (depth 0: the key sentence opens the prompt, then the
§6 filler) are read together. At fold counts n = 2, 3, 4, 6, 8, 12, … (2^k, every one a
curriculum level of the passkey training, and 1.5 · 2^k, none of them one), where the §6
prompt of n · w tokens asks its question, the script records

- accuracy: the model's greedy answer to the question asked there, against the key (that
  prompt is exactly `foldformer eval passkey`'s at n · w tokens and depth 0);
- key_spread: how far the rows' memories are from their mean, over the mean memory's norm.
  The rows differ only in their key, so this is the part of the memory that depends on it:
  it stays if the memory still holds the key, and falls to 0 if the key is forgotten;
- drift: how far the mean memory is from the mean memory at the first checkpoint past
  `--trained` tokens (the longest training prompt), over its norm: whether the state the
  read-out sees keeps moving away from the states it was trained on;
- held: the share of memory entries (row, channel) that did not change at all over the last
  fold (a gate holding exactly).

Writes OUT.json (the checkpoints, the command, the date) and prints a table. A CPU is enough
for 1M tokens of the tiny passkey models (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def trace(model, tokenizer, keys: list[str], max_tokens: int, trained: int):
    from foldformer.data.passkey import QUESTION, build_passkey_prompt
    from foldformer.evaluate.passkey import is_correct
    from foldformer.generate import greedy_generate

    prompts = [build_passkey_prompt(tokenizer, max_tokens, 0.0, key=k) for k in keys]
    context = {p.context_len for p in prompts}
    if len(context) != 1 or len({tuple(p.ids[p.key_end :]) for p in prompts}) != 1:
        raise ValueError("the prompts must differ only in their key")
    ids = torch.tensor([p.ids[: p.context_len] for p in prompts])
    question = torch.tensor(list(tokenizer.encode(" " + QUESTION))).repeat(len(keys), 1)
    w = model.config.segment_len
    # Checkpoints: the fold counts n = 2^k (every curriculum level is one) and 1.5 * 2^k (none
    # is); the question is asked where the §6 prompt of n * w tokens asks it, so the prompt up
    # to there is exactly `foldformer eval passkey`'s (its prefix is this prompt's).
    counts = sorted({c for k in range(40) for c in (2**k, 3 * 2 ** (k - 1)) if c >= 2})
    marks = []
    for n in counts:
        if n * w > max_tokens:
            break
        short = build_passkey_prompt(tokenizer, n * w, 0.0, key=keys[0])
        assert short.ids[: short.context_len] == prompts[0].ids[: short.context_len]
        marks.append(short.context_len)
    folds = dict(zip(marks, counts, strict=False))
    rows, state, done, reference = [], None, 0, None
    for mark in marks:
        if mark - done > w:  # to one fold before the mark, then the last fold apart
            state = model(ids[:, done : mark - w], memory=state, logits_to_keep=1).memory
            done = mark - w
        before = state.memory.clone() if state is not None else None
        state = model(ids[:, done:mark], memory=state, logits_to_keep=1).memory
        done = mark
        memory = state.memory  # (K, m, d): the memory that entered the current fold
        mean = memory.mean(0)
        norm = mean.norm().item()
        spread = (memory - mean).flatten(1).norm(dim=1).mean().item() / norm
        if reference is None and mark >= trained:
            reference = mean.clone()
        drift = (mean - reference).norm().item() / norm if reference is not None else None
        held = (memory == before).float().mean().item() if before is not None else None
        copy = type(state).from_state_dict({k: v.clone() for k, v in state.state_dict().items()})
        answer = greedy_generate(model, question, 8, memory=copy)
        texts = [tokenizer.decode(a.tolist()) for a in answer]
        correct = sum(is_correct(text, key) for text, key in zip(texts, keys, strict=True))
        n = folds[mark]
        rows.append({"folds": n, "level": n & (n - 1) == 0, "tokens": mark,
                     "key_spread": spread, "drift": drift, "held": held,
                     "accuracy": correct / len(keys), "answers": texts[:3]})  # fmt: skip
        print(f"{n:>7,} folds {'(a level)' if n & (n - 1) == 0 else '         '} "
              f"spread {spread:.4f}  drift {'-' if drift is None else format(drift, '.3f')}  "
              f"held {'-' if held is None else format(held, '.3f')}  accuracy "
              f"{correct}/{len(keys)}  {texts[0]!r}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    from foldformer.evaluate.common import load_checkpoint, parse_list

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--max-tokens", default="1M")
    parser.add_argument("--trained", default="8K", help="the longest training prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    (max_tokens,), (trained,) = parse_list(args.max_tokens), parse_list(args.trained)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    keys = [str(int(k)) for k in torch.randint(10_000, 100_000, (args.keys,), generator=generator)]
    model, tokenizer = load_checkpoint(args.model, "cpu")
    started = time.time()
    with torch.no_grad():
        rows = trace(model, tokenizer, keys, max_tokens, trained)
    record = {
        "benchmark": "passkey trace (benchmarks/passkey_trace.py)",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model": args.model,
        "keys": keys,
        "trained_tokens": trained,
        "seconds": time.time() - started,
        "threads": torch.get_num_threads(),
        "checkpoints": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
