"""Why does retention stop near twice the training distance? Train a key-recall model, then
follow a key through the folds (docs/retrieval.md).

    PYTHONPATH=src python benchmarks/retention.py --out runs/retention/sigmoid \
        --gate_activation sigmoid --max-folds 32 --minutes 3

Trains the demo's `tiny` folded model (w = m = 8, gated memory) on `foldformer.demo.
KeyRecallTask` with the curriculum up to --max-folds, then writes retention.json with, for
distances of 1 … --eval-folds folds:

- recall: exact-match accuracy of the 3-digit key (the model's own read-out);
- probe: accuracy of a ridge-regression probe reading the key's first digit from the memory
  after k folds (fitted and scored on disjoint samples at each k: is the key still *there*?);
- gate: mean gate value and the share of channels held exactly (g = 1) at each fold;
- norm: mean memory row norm after each fold;
- drift: relative change of the memory from one fold to the next.

and retention.png with the curves. Runs on a CPU in minutes; --device cuda on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from foldformer import __version__
from foldformer.data.synthetic import evaluate_accuracy
from foldformer.demo import KeyRecallTask
from foldformer.models import load_model
from foldformer.train import load_run_config, train


def train_key_recall(args: argparse.Namespace, out: Path) -> tuple[torch.nn.Module, KeyRecallTask]:
    overrides = {
        "max_steps": str(args.max_steps), "seed": str(args.seed), "progress": "false",
        "eval_every": "0", "save_every": "0", "log_every": "50",
        "max_minutes": str(args.minutes), "warmup_steps": "0", "min_lr_ratio": "1.0",
        "weight_decay": "0.0", "beta2": "0.999", "device": args.device,
        "gate_activation": args.gate_activation, "gate_bias": str(args.gate_bias),
        "memory_gate": str(args.gate_activation != "none").lower(),
        # the retention levers (docs/retrieval.md "Levers"): defaults are today's model
        "memory_len": str(args.memory_len), "memory_noise": str(args.memory_noise),
        "memory_fifo": str(args.memory_fifo).lower(),
        "memory_write": str(args.memory_write).lower(),
    }  # fmt: skip
    if args.gate_activation == "none":
        overrides.pop("gate_activation")
    run = load_run_config(preset="tiny", overrides=overrides)
    task = KeyRecallTask(run.train.batch_size, run.model["segment_len"],
                         max_folds=args.max_folds, seed=args.seed, window=128,
                         uniform=not args.levels_only, fixed_filler=args.fixed_filler)  # fmt: skip
    started = time.time()
    summary = train(run, out / "model", batch_source=task)
    summary["train_seconds"] = round(time.time() - started, 1)
    summary["curriculum_level"] = task.level
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return load_model(out / "model" / "final", device=args.device).eval(), task


@torch.no_grad()
def follow_key(model, task: KeyRecallTask, n_folds: int, n_samples: int, device) -> dict:
    """Run samples fold by fold; record the memory, the gate and norms after every fold."""
    w = model.config.segment_len
    batch = task.eval_batch(n_folds, n_samples, index=7).to(device)
    keys = batch.input_ids[:, 0] - task.digits[0]  # the first key digit, 0 … 9
    gates: list[torch.Tensor] = []
    gate = getattr(model, "memory_gate", None)
    hook = None
    if gate is not None:
        hook = gate.register_forward_hook(lambda mod, inp, out: gates.append(mod.gate(*inp)))
    state, memories = None, []
    for fold in range(n_folds):
        out = model(batch.input_ids[:, fold * w : (fold + 1) * w], memory=state)
        state = out.memory
        memories.append(state.memory.float().cpu())
    if hook is not None:
        hook.remove()
    result = {"fold": list(range(1, n_folds + 1)), "probe": [], "norm": [], "drift": []}
    y = keys.cpu().numpy()
    for k, mem in enumerate(memories):
        result["probe"].append(probe_accuracy(mem.flatten(1).numpy(), y))
        result["norm"].append(float(mem.norm(dim=-1).mean()))
        prev = memories[k - 1] if k else None
        result["drift"].append(
            None if prev is None else float((mem - prev).norm() / prev.norm().clamp(min=1e-9))
        )
    if gates:
        result["gate_mean"] = [float(g.float().mean()) for g in gates]
        result["gate_held"] = [float((g >= 1).float().mean()) for g in gates]
    return result


def probe_accuracy(features: np.ndarray, labels: np.ndarray, ridge: float = 1.0) -> float:
    """Fit ridge regression to one-hot labels on the first 3/4 of the rows, score the rest."""
    n = len(labels)
    split = 3 * n // 4
    mean = features[:split].mean(0)
    x = features - mean
    x /= x[:split].std(0) + 1e-6
    onehot = np.eye(10)[labels]
    a = x[:split]
    weights = np.linalg.solve(a.T @ a + ridge * split * np.eye(a.shape[1]), a.T @ onehot[:split])
    predicted = (x[split:] @ weights).argmax(1)
    return float((predicted == labels[split:]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--gate_activation",
        default="sigmoid",
        choices=["sigmoid", "hardsigmoid", "clamp_st", "none"],
    )
    parser.add_argument("--gate_bias", type=float, default=0.0)
    parser.add_argument("--memory_len", type=int, default=8, help="m (w = 8)")
    parser.add_argument("--memory_noise", type=float, default=0.0)
    parser.add_argument("--memory_fifo", action="store_true")
    parser.add_argument("--memory_write", action="store_true")
    parser.add_argument(
        "--levels-only",
        action="store_true",
        help="mixed-in batches at lower "
        "curriculum levels only (1, 2, 4, ... folds), not at any shorter distance",
    )
    parser.add_argument(
        "--fixed-filler",
        action="store_true",
        help="the same filler in every sample (letters in order), not random",
    )
    parser.add_argument("--max-folds", type=int, default=32)
    parser.add_argument("--eval-folds", type=int, default=1024)
    parser.add_argument("--follow-folds", type=int, default=256)
    parser.add_argument("--probe-samples", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--far-samples", type=int, help="samples at --far-from folds and beyond")
    parser.add_argument("--far-from", type=int, default=2048)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="evaluate this trained model (a final/ folder) only")
    parser.add_argument("--eval-min-folds", type=int, default=1)
    parser.add_argument("--distances", help="comma-separated folds to measure recall at, instead "
                        "of the powers of two from --eval-min-folds to --eval-folds")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = load_model(args.model, device=args.device).eval()
        task = KeyRecallTask(32, model.config.segment_len, max_folds=args.max_folds, seed=args.seed,
                             fixed_filler=args.fixed_filler)  # fmt: skip
    else:
        model, task = train_key_recall(args, out)
    distances = [2**i for i in range(args.eval_folds.bit_length()) if args.eval_min_folds <= 2**i]
    if args.distances:
        distances = [int(n) for n in args.distances.split(",")]
    samples = {n: (args.far_samples or args.samples) if n >= args.far_from else args.samples
               for n in distances}  # fmt: skip
    recall = {
        n: evaluate_accuracy(
            model, task, n, n_samples=samples[n], batch_size=samples[n], device=args.device
        )  # fmt: skip
        for n in distances
    }
    print("recall by distance (folds):", {n: f"{a:.1%}" for n, a in recall.items()})
    followed = (
        follow_key(model, task, args.follow_folds, args.probe_samples, args.device)
        if args.follow_folds
        else None
    )
    record = {
        "what": "key recall by distance and the key followed fold by fold (benchmarks/retention.py)",
        "config": vars(args),
        "model": model.config.to_dict(),
        "trained_to_folds": args.max_folds,
        "curriculum_level_reached": task.level,
        "recall": {str(n): a for n, a in recall.items()},
        "samples": {str(n): k for n, k in samples.items()},
        "followed": followed,
        "foldformer": __version__,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "retention.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'retention.json'}")


if __name__ == "__main__":
    main()
