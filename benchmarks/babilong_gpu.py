"""BABILong on one GPU (issue 13 item 4, DESIGN.md §6): the folded model, the in-house RMT and
the no-memory model at matched parameters, fine-tuned with a curriculum over length on prompts
of at most 16K tokens, then asked bAbI questions hidden in 0 to 1M (or 10M) tokens of books.

    PYTHONPATH=src python3 benchmarks/babilong_gpu.py --pg PG_ARCHIVE --babi BABI_DIR --out OUT \\
        [--models folded,rmt,no_memory] [--tasks qa1] [--minutes 2.5] \\
        [--lengths 0,4K,16K,128K,1M] [--samples 100] [--deadline 450] \\
        [--models folded,folded_init --init MODEL_DIR] \\
        [--set key=value ...] [--data-options 'uniform=true&straddle=0.5']
    SMOKE=1 PYTHONPATH=src python3 benchmarks/babilong_gpu.py ... --out OUT   # CPU, toy sizes

Models. The folded one is the passkey recipe (benchmarks/passkey_gpu.py RECIPE: the `tiny`
preset at w = m = 128, d = 128, 2 layers, memory gate clamp_st); `--set` changes any field for
every model (`--set model.d_model=256`, `--set train.lr=3e-4`). RMT and no-memory take its shape
from `baseline_configs` and their d_ff from `match_parameters` (non-embedding parameters within
10% of the folded model's, as `foldformer compare` does); the counts are checked again on the
trained checkpoints. `folded_init` is the folded model started from the weights of `--init`
(train.init_from: its shape must be the recipe's, e.g. the passkey model), so a call can train
it beside the folded model from scratch; the others start from scratch.

Data. Training: `babilong:TASK:BABI?books=PG?split=train&max_tokens=16384&mix=0.5` (`--max-train-tokens`; the
curriculum 0, 256, 512, ... 16K tokens, moving on at 90% answer accuracy, half the batches at a
random shorter length; background from the pg training authors; the answer and its "." labelled;
`--data-options` appends more task options), questions from the first 90% of the stories of the task's bAbI train file.
Evaluation: the last 10% of the stories (`split_babi`: whole stories, so no story's facts are on
both sides; en-10k has 1,000 held-out questions a task), the same `--samples` questions at every
length, background from the pg validation authors only (`PG?split=validation`), each prompt
exactly its length (`exact=True`: a cut sentence before the question; the 9.2M bytes of the
validation authors repeat from their start past that, so a 10M prompt holds some of them
twice), all samples of a length in one batch, the CUDA-graph ingest, greedy answer, first word
against the answer. It reads nothing but --pg and --babi.

Running. One process per (model, task), all at once on the one GPU (like gpu_seed_all.sh),
with the same data, seed, batch, steps cap and a wall-clock cap of --minutes each; then each
evaluates its lengths in increasing order, a length only when its estimated time (the last
length's, scaled by length) ends before --deadline seconds from the start, so the short ones
are kept; a process still running 30 s past the deadline is stopped (its saved lengths kept).
Estimate: 1M tokens x 100 rows took 16 s with the CUDA graph for the passkey model alone on an
H200 and 43 s with three evaluating at once (docs/retrieval.md, rounds 5 and 4), so 1M is
16-45 s per model and task and 10M about 160-450 s (not in the default lengths; building its
100 prompts takes about 30 s more and 4 GB of host memory per process). The default call
(3 models, qa1, 2.5 min, lengths to 1M): about 30 s of set-up (reading and tokenizing the
books), 2.5 min of training, about 1.5 min of evaluation: about 5 minutes, at most
--deadline (450 s) + 30 s + packing. More tasks in one call slow every process (4 tasks x 3
models: give --minutes 2 and expect the 1M cells to be cut): one task a call is the plan.

Writes OUT/babilong.json (per model, task and length: accuracy, Wilson interval, n, mean prompt
tokens, seconds; per model: parameters, training steps and tokens, curriculum level reached;
commands, hardware, date, seed), OUT/babilong.png (accuracy against length, one line per model,
one panel per task) and OUT/babilong_logs.tar.gz (every process's log, run config, metrics and
per-length results; no checkpoints), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey_gpu import RECIPE  # noqa: E402  (the folded recipe, shared)

SMOKE = os.environ.get("SMOKE") == "1"
MAX_TRAIN_TOKENS = 16384
MODELS = ("folded", "folded_init", "rmt", "no_memory")
FOLDED_INIT = "folded_init"  # the folded model, started from --init's weights


def base_model(name: str) -> str:
    """The model an arm trains: folded_init is the folded model."""
    return "folded" if name == FOLDED_INIT else name


# Toy sizes for a CPU: every stage runs, in seconds.
SMOKE_SET = {
    "model.d_model": "32",
    "model.segment_len": "16",
    "model.memory_len": "16",
    "train.seq_len": "16",
    "train.batch_size": "4",
    "train.log_every": "1",
    "train.device": "cpu",
}


def base_overrides(args) -> dict[str, str]:
    overrides = dict(RECIPE)
    overrides.pop("data.train")  # the task's spec, per process
    overrides.update(SMOKE_SET if args.smoke else {"train.device": "cuda"})
    overrides["train.max_minutes"] = str(args.minutes)
    overrides["train.seed"] = str(args.seed)  # weights and data order; --seed also picks questions
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = value
    return overrides


def plan(args) -> tuple[int, dict[str, dict]]:
    """(the folded model's non-embedding parameters, {model: run config dict without data})."""
    from foldformer.train import load_run_config
    from foldformer.variants.baselines import (
        baseline_configs,
        config_values,
        count_parameters,
        match_parameters,
    )

    overrides = base_overrides(args)
    folded = load_run_config(None, "tiny", overrides).to_dict()
    base = config_values(folded["model"])
    names = {base_model(name) for name in args.models} | {"folded"}
    configs = baseline_configs(base, names=sorted(names))
    target = count_parameters("folded", config_values(configs["folded"]))
    runs = {}
    for name in args.models:
        kind = base_model(name)
        model_type = configs[kind]["model_type"]
        if kind == "folded":
            values, count = config_values(configs["folded"]), target
        else:
            values, count = match_parameters(model_type, configs[kind], target)
        run = {**folded, "model": {"model_type": model_type, **values}}
        run["train"] = dict(folded["train"])
        if name == FOLDED_INIT:
            run["train"]["init_from"] = args.init
        runs[name] = {"run": run, "planned_parameters": count}
    return target, runs


def data_spec(args, task: str) -> str:
    max_tokens = 64 if args.smoke else args.max_train_tokens
    # mix=0.5: half the batches at a random shorter length, so the short ones stay learned
    # (the passkey's round 4 forgot them without it; docs/retrieval.md)
    extra = f"&{args.data_options}" if args.data_options else ""
    return (f"babilong:{task}:{args.babi}?books={args.pg}?split=train&max_tokens={max_tokens}"
            f"&mix=0.5{extra}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# One (model, task) process: train, then evaluate its lengths until the deadline
# ---------------------------------------------------------------------------------------------


def worker(job_path: Path) -> None:
    import torch

    from foldformer.data.babilong import (
        TokenizedBackground,
        babi_file,
        load_babi,
        load_background,
        split_babi,
    )
    from foldformer.evaluate.babilong import build_eval_samples, evaluate_babilong
    from foldformer.evaluate.common import load_checkpoint
    from foldformer.train import RunConfig, Trainer

    job = json.loads(job_path.read_text())
    work, log_dir = Path(job["work"]), Path(job["log_dir"])
    result = {"model": job["model"], "task": job["task"], "cells": []}

    def save() -> None:  # after every stage, so a process cut off still leaves its results
        (log_dir / "result.tmp").write_text(json.dumps(result, indent=1))
        (log_dir / "result.tmp").replace(log_dir / "result.json")

    model_dir = work / "run" / "final"
    if job.get("trained"):  # --trained: evaluate a model of an earlier call, train nothing
        model_dir = Path(job["trained"])
        # how it was trained: the earlier call's record (its run config is in its logs)
        earlier = model_dir.parent / "result.json"
        train = json.loads(earlier.read_text()).get("train", {}) if earlier.is_file() else {}
        result["train"] = {**train, "trained": str(model_dir)}
    else:
        t0 = time.time()
        trainer = Trainer(RunConfig.from_dict(job["run"]), work / "run")
        result["train"] = trainer.train()
        result["train"]["seconds"] = time.time() - t0
        result["train"]["level"] = trainer.source.level  # the curriculum's length at the end
        for name in ("run_config.json", "metrics.jsonl", "summary.json"):
            if (work / "run" / name).is_file():
                shutil.copy(work / "run" / name, log_dir / name)
        if job.get("keep_model"):  # weights and config only (a few MB): no optimizer state
            (log_dir / "model").mkdir()
            for path in model_dir.iterdir():
                if path.suffix in (".json", ".safetensors"):
                    shutil.copy(path, log_dir / "model" / path.name)
    save()

    device = job["run"]["train"]["device"]
    model, tokenizer = load_checkpoint(model_dir, device)
    result["parameters"] = int(model.num_parameters(non_embedding=True))
    _, held_out = split_babi(load_babi(babi_file(job["task"], job["babi"])))
    background = TokenizedBackground(load_background(f"{job['pg']}?split=validation"), tokenizer)
    result["validation_questions"] = len(held_out)
    result["background_tokens"] = int(background.starts[-1])
    previous = None  # (length, seconds) of the last length evaluated
    for length in job["lengths"]:
        # Length 0 is many small batches (its prompts differ in length): no basis for a guess.
        estimate = previous[1] * length / previous[0] if previous else 0.0
        if time.time() + estimate > job["deadline"]:
            result["cells"].append({"length": length, "skipped": f"estimated {estimate:.0f} s "
                                    "would pass the deadline"})  # fmt: skip
            save()
            break
        t1 = time.time()
        examples = build_eval_samples(held_out, background, [length], job["samples"], tokenizer,
                                      seed=job["seed"], exact=True,
                                      facts_within=job.get("facts_within", 0),
                                      facts_at=job.get("facts_at", "end"))  # fmt: skip
        built = time.time() - t1
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        (cell,) = evaluate_babilong(model, tokenizer, examples, batch_size=job["samples"],
                                    progress=False, cuda_graph=True)  # fmt: skip
        seconds = time.time() - t1
        previous = (length, seconds) if length else None
        result["cells"].append({
            "length": length, "accuracy": cell.accuracy, "correct": cell.correct,
            "n": cell.samples, "mean_prompt_tokens": cell.mean_prompt_tokens,
            "seconds": seconds, "build_seconds": built,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available() else None,
            "examples": cell.outputs[:5],
        })  # fmt: skip
        save()
        print(f"{job['model']} {job['task']} {length}: {cell.accuracy:.0%} in {seconds:.0f} s",
              flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The whole call: plan, start every process, wait, gather, plot, pack
# ---------------------------------------------------------------------------------------------


def plot(results: list[dict], tasks: list[str], models: list[str], path: Path) -> None:
    from foldformer.evaluate.common import format_size, new_figure, save_figure

    fig, axes = new_figure(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lengths = sorted({c["length"] for r in results if r["task"] == task for c in r["cells"]})
        for name in models:
            (r,) = [r for r in results if (r["model"], r["task"]) == (name, task)] or [None]
            cells = {c["length"]: c for c in (r or {}).get("cells", []) if "accuracy" in c}
            xs = [i for i, n in enumerate(lengths) if n in cells]
            ax.plot(xs, [cells[lengths[i]]["accuracy"] for i in xs], marker="o", label=name)
        ax.set_xticks(range(len(lengths)), [format_size(n) for n in lengths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"BABILong {task}")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def table(results: list[dict], tasks: list[str], models: list[str]) -> list[list[str]]:
    from foldformer.evaluate.common import format_size

    rows = []
    for task in tasks:
        for r in results:
            if r["task"] != task:
                continue
            row = [task, r["model"], f"{r.get('parameters', 0):,}", r.get("train", {}).get("steps")]
            for c in r["cells"]:
                cell = f"{c['accuracy']:.0%}" if "accuracy" in c else "skipped"
                row.append(f"{format_size(c['length'])} {cell}")
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from foldformer.data.babilong import BABI_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", help="pg.tar.xz (or any books spec taking ?split=)")
    parser.add_argument("--babi", help="bAbI directory holding qaN_*_train.txt (en-10k)")
    parser.add_argument("--out")
    parser.add_argument("--models", default="folded,rmt,no_memory")
    parser.add_argument("--tasks", default="qa1")
    parser.add_argument("--minutes", type=float, default=2.5, help="training cap per process")
    parser.add_argument("--lengths", default="0,4K,16K,128K,1M")
    parser.add_argument(
        "--max-train-tokens",
        type=int,
        default=MAX_TRAIN_TOKENS,
        help="the curriculum's longest prompt (at most 16K: issue 13; 8K keeps four "
        "processes at batch 128 within one H200's memory)",
    )
    parser.add_argument("--samples", type=int, default=100, help="questions per length")
    parser.add_argument("--deadline", type=float, default=450.0, help="seconds from the start")
    parser.add_argument("--init", help=f"the {FOLDED_INIT} model starts from this model's weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--data-options",
        default="",
        metavar="K=V&...",
        help="more training-task options, e.g. 'uniform=true&straddle=0.5' (docs/data.md)",
    )
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="pack each trained model's weights and config into the logs",
    )
    parser.add_argument(
        "--trained",
        help="evaluate the models of an earlier call (its "
        "unpacked babilong_logs folder: MODEL_TASK/model), training nothing",
    )
    parser.add_argument(
        "--facts-within",
        default="0",
        metavar="TOKENS",
        help="evaluation diagnosis: the facts only among the first or last TOKENS of background "
        "(build_babilong_sample; 0: anywhere, the default)",
    )
    parser.add_argument("--facts-at", choices=("start", "end"), default="end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/babilong_runs", help="checkpoints (not in OUT)")
    parser.add_argument("--smoke", action="store_true", default=SMOKE, help="CPU, toy sizes")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    for flag in ("pg", "babi", "out"):
        if not getattr(args, flag):
            parser.error(f"--{flag} is required")
    args.models, args.tasks = args.models.split(","), args.tasks.split(",")
    for kind, names, known in (("model", args.models, MODELS),
                               ("task", args.tasks, BABI_TASKS)):  # fmt: skip
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"--{kind}s: unknown {unknown}; known: {', '.join(known)}")
    if args.init and FOLDED_INIT not in args.models:
        parser.error(f"--init starts the {FOLDED_INIT} model: add it to --models")
    if FOLDED_INIT in args.models and not (args.init or args.trained):
        parser.error(f"--models {FOLDED_INIT} needs --init (or --trained: an earlier call's)")
    for path in (args.pg, args.babi) + tuple(p for p in (args.trained, args.init) if p):
        if not Path(path).exists():
            parser.error(f"{path!r} does not exist")
    if not 0 < args.max_train_tokens <= MAX_TRAIN_TOKENS:
        parser.error(
            f"--max-train-tokens {args.max_train_tokens}: must be in 1..{MAX_TRAIN_TOKENS}"
        )
    if args.samples < 1:
        parser.error(f"--samples {args.samples}: must be >= 1")
    from foldformer.evaluate.common import parse_size

    try:  # parse_size refuses negative sizes
        args.facts_within = parse_size(args.facts_within)
    except ValueError as error:
        parser.error(f"--facts-within {args.facts_within!r}: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    return run(args)


def run(args) -> int:
    import torch

    from foldformer.evaluate.common import parse_list, print_table, wilson_interval
    from foldformer.evaluate.records import hardware
    from foldformer.variants.baselines import BASELINES

    started = time.time()
    lengths = sorted(parse_list(args.lengths))
    out, work = Path(args.out), Path(args.work)
    logs = out / "babilong_logs"
    shutil.rmtree(logs, ignore_errors=True)
    from foldformer.config import ConfigError

    try:
        target, runs = plan(args)
    except (ConfigError, ValueError) as error:  # a bad --set, or shapes that cannot match
        raise SystemExit(f"error: {error}") from None
    print(f"non-embedding parameters (folded {target:,}): "
          + ", ".join(f"{n} {r['planned_parameters']:,}" for n, r in runs.items()))  # fmt: skip

    processes = {}
    # The processes share the cores: each its part of them, or their CPU threads thrash (toy
    # sizes on a CPU run fastest on one thread each).
    share = (os.cpu_count() or 1) // (len(args.tasks) * len(args.models))
    threads = 1 if args.smoke else max(1, share)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    for task in args.tasks:
        for name in args.models:
            key = f"{name}_{task}"
            (logs / key).mkdir(parents=True)
            shutil.rmtree(work / key, ignore_errors=True)
            (work / key).mkdir(parents=True)
            run = json.loads(json.dumps(runs[name]["run"]))
            run["data"]["train"] = [data_spec(args, task)]
            job = {"model": name, "task": task, "run": run, "babi": args.babi, "pg": args.pg,
                   "lengths": lengths, "samples": args.samples, "seed": args.seed,
                   "facts_within": args.facts_within, "facts_at": args.facts_at,
                   "deadline": started + args.deadline, "work": str(work / key),
                   "log_dir": str(logs / key)}  # fmt: skip
            job["keep_model"] = args.keep_models
            if args.trained:
                job["trained"] = str(Path(args.trained) / key / "model")
                if not Path(job["trained"], "config.json").is_file():
                    raise SystemExit(f"error: --trained {args.trained}: no {key}/model/config.json")
            (logs / key / "job.json").write_text(json.dumps(job, indent=1))
            command = [sys.executable, __file__, "--worker", str(logs / key / "job.json")]
            with open(logs / key / "log.txt", "w") as log:
                processes[key] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env)  # fmt: skip
    # A process still running past the deadline (plus the time to write its last length) is
    # stopped: what it saved so far is kept.
    for key, process in processes.items():
        try:
            process.wait(timeout=max(1.0, started + args.deadline + 30 - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            print(f"{key}: stopped at the deadline")

    results = []
    for key, process in processes.items():
        path = logs / key / "result.json"
        r = json.loads(path.read_text()) if path.is_file() else {}
        name, task = key.rsplit("_", 1)
        r.update(model=name, task=task, returncode=process.returncode)
        r.setdefault("cells", [])
        r["planned_parameters"] = runs[name]["planned_parameters"]
        r["parameter_ratio"] = r.get("parameters", r["planned_parameters"]) / target
        r["matched"] = abs(r["parameter_ratio"] - 1) <= 0.10
        r["description"] = (f"folded, started from {args.init}" if name == FOLDED_INIT
                            else BASELINES[name][1])  # fmt: skip
        for c in r["cells"]:
            if "accuracy" in c:
                c["interval"] = wilson_interval(c["correct"], c["n"])
        results.append(r)

    summary = {
        "benchmark": "BABILong (benchmarks/babilong_gpu.py)",
        "command": " ".join([sys.executable, *sys.argv]),
        "worker_command": f"{sys.executable} {__file__} --worker JOB.json (one per model, task)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.time() - started,
        "hardware": hardware("cuda" if torch.cuda.is_available() else "cpu"),
        "seed": args.seed,
        "smoke": args.smoke,
        "target_parameters": target,
        "tokens_note": "train.tokens: the token positions of every training batch, padding "
        "included (since commit dcba87c; records before it hold steps x batch_size x seq_len, "
        "fewer than were read: a BABILong row is as long as its curriculum level)",
        "runs": {n: r["run"] for n, r in runs.items()},
        "trained": args.trained,  # set: the models are an earlier call's; `runs` is only
        # this call's plan, each result's `train` is how its model was trained
        "train_data": {t: data_spec(args, t) for t in args.tasks},
        "eval_data": {
            "background": f"{args.pg}?split=validation",
            "babi": args.babi,
            "questions": "held-out stories of the train file (split_babi: last 10%)",
            "samples": args.samples,
            "lengths": lengths,
            "exact_length": True,
            "facts": "anywhere"
            if not args.facts_within
            else f"within the {args.facts_at} {args.facts_within} tokens of background",
        },  # fmt: skip
        "results": results,
    }
    (out / "babilong.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.tasks, args.models, out / "babilong.png")
    with tarfile.open(out / "babilong_logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="babilong_logs")
    shutil.rmtree(logs)
    rows = table(results, args.tasks, args.models)
    width = max(map(len, rows), default=4)
    print_table([r + [""] * (width - len(r)) for r in rows],
                ["task", "model", "params", "steps"] + [""] * (width - 4))  # fmt: skip
    print(f"wrote {out / 'babilong.json'}, babilong.png, babilong_logs.tar.gz "
          f"in {time.time() - started:.0f} s")  # fmt: skip
    failed = [r["model"] + "_" + r["task"] for r in results if r["returncode"]]
    if failed:
        print(f"failed or stopped: {failed} (their logs are in the tarball)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
