"""Does the path amplitude of `foldformer.explain` see what a trained model retrieves?
(docs/explain.md, item 4 of issue 16.)

    PYTHONPATH=src python benchmarks/explain_retention.py --out benchmarks/results/explain \
        --key-recall none=runs/retention/none/model/final sigmoid=... \
        --passkey clamp_st=.carry/round3/passkey_clamp_st/final sigmoid=...

For key-recall models (benchmarks/retention.py: a 3-digit key, filler, "?") at distances of
--folds folds, and passkey models (DESIGN.md §6 prompts) at --lengths tokens and --depths,
--samples prompts each: the amplitude of the position that predicts the answer's first token
(the "?" / the question's last token) on the key's tokens, its context horizons (50/90/99%),
the share left in the initial memory, and the model's own greedy answer on the same prompts
(exact match), for each of --gates (how the gate's mix enters the rollout: its channel mean, or
every channel carried apart). Writes explain_retention.json (one record per model and distance).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import time
from pathlib import Path

import torch

from foldformer import __version__
from foldformer.data.passkey import build_passkey_prompt
from foldformer.data.tokenizers import ByteTokenizer
from foldformer.explain import HORIZON_SHARES, explain
from foldformer.generate import greedy_generate
from foldformer.models import load_model

DIGITS, FILLER = "0123456789", "abcdefghijklmnop"


def measure(model, ids: list[int], key: range, answer: list[int], gate: str) -> dict:
    """Amplitude of the last position on the key tokens, horizons, and the model's answer."""
    (record,) = explain(model, ids, [len(ids) - 1], gate=gate)
    return {
        "key_share": float(record.amplitude[key.start : key.stop].sum()),
        "uniform_share": len(key) / len(ids),  # what a flat amplitude would put there
        "initial_memory": record.initial_memory,
        **{f"horizon_{round(100 * s)}": record.horizon(s) for s in HORIZON_SHARES},
        "correct": greedy_generate(model, ids, len(answer))[0].tolist() == answer,
    }


def key_recall_prompts(segment_len: int, folds: int, samples: int, seed: int):
    """benchmarks/retention.py's rows: key, filler up to `folds` folds from the key, "?"."""
    rng, tok = random.Random(seed), ByteTokenizer()
    for _ in range(samples):
        key = "".join(rng.choice(DIGITS) for _ in range(3))
        filler = "".join(rng.choice(FILLER) for _ in range(folds * segment_len - 3))
        yield tok.encode(key + filler + "?"), range(0, 3), tok.encode(key)


def passkey_prompts(length: int, depth: float, samples: int, seed: int):
    tok = ByteTokenizer()
    for i in range(samples):
        prompt = build_passkey_prompt(tok, length, depth, seed=seed + i)
        yield prompt.ids, range(prompt.key_start, prompt.key_end), prompt.answer_ids


def summarise(rows: list[dict]) -> dict:
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "correct"}
    return {**mean, "accuracy": sum(r["correct"] for r in rows) / len(rows), "samples": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--key-recall", nargs="*", default=[], metavar="NAME=DIR")
    parser.add_argument("--passkey", nargs="*", default=[], metavar="NAME=DIR")
    parser.add_argument("--folds", nargs="+", type=int, default=[1, 4, 32, 128, 256, 1024])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--gates", nargs="+", default=["mean", "channels"],
                        help="how a gated memory's mix enters (foldformer.explain.GATES)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records, started = [], time.time()
    for task, models in (("key_recall", args.key_recall), ("passkey", args.passkey)):
        for spec in models:
            name, directory = spec.split("=", 1)
            model = load_model(directory).eval()
            w = model.config.segment_len
            if task == "key_recall":
                grid = [({"folds": f}, list(key_recall_prompts(w, f, args.samples, args.seed)))
                        for f in args.folds]  # fmt: skip
            else:
                grid = [({"tokens": n, "depth": d}, list(passkey_prompts(n, d, args.samples, args.seed)))
                        for n in args.lengths for d in args.depths]  # fmt: skip
            gates = args.gates if model.memory_gate is not None else ["mean"]  # plain: the same
            for (where, prompts), gate in itertools.product(grid, gates):
                rows = [measure(model, ids, key, answer, gate) for ids, key, answer in prompts]
                record = {"task": task, "model": name, "gate": gate, **where, **summarise(rows)}
                print(json.dumps(record), flush=True)
                records.append(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"foldformer": __version__, "torch": torch.__version__, "machine": platform.machine(),
            "seconds": round(time.time() - started), "argv": vars(args)}  # fmt: skip
    (out / "explain_retention.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
