"""Helpers of benchmarks/scaling.sh: start the results and tokenize the corpus once, and turn each training run's
metrics.jsonl into one row of the scaling JSON (rewritten after every run).

    python benchmarks/scaling.py init OUT.json --data SPEC --cache_dir DIR [--tokenizer bytes] \
        [--command-line "..."] [--settings JSON]
    python benchmarks/scaling.py record OUT.json --label ddp --gpus 2 --run-dir DIR --rc 0 \
        --seconds 41.2 --command "torchrun ..." [--log FILE] [--skipped REASON]

Throughput of a run: the `tokens_per_s` intervals logged by the training loop (global tokens,
all ranks), skipping the first interval (it holds compilation and start-up), combined as
total tokens over total time. Scaling efficiency at N GPUs = (tokens/s per GPU at N) /
(tokens/s of the 1-GPU run): 1.0 is perfect weak scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path
from typing import Any


def run_throughput(metrics_path: Path, skip: int = 1) -> dict[str, Any]:
    """Tokens/s of a run from its metrics.jsonl, the first `skip` intervals left out."""
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics file {metrics_path}")
    records = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "tokens_per_s" in record:
            records.append(record)
    if len(records) <= skip:
        raise ValueError(
            f"{metrics_path} has {len(records)} logged interval(s); need more than {skip} "
            "(the first holds compilation): raise --max_steps or lower --log_every"
        )
    tokens = seconds = 0.0
    previous = records[skip - 1]["tokens"] if skip else 0
    for record in records[skip:]:
        interval_tokens = record["tokens"] - previous
        previous = record["tokens"]
        tokens += interval_tokens
        seconds += interval_tokens / record["tokens_per_s"]
    out = {
        "tokens_per_s": tokens / seconds,
        "intervals_used": len(records) - skip,
        "steps_measured": records[-1]["step"] - records[skip - 1]["step"] if skip else None,
        "interval_tokens_per_s": [r["tokens_per_s"] for r in records],
        "final_loss": records[-1].get("loss"),
    }
    if "max_memory_gb" in records[-1]:
        out["max_memory_gb"] = records[-1]["max_memory_gb"]
    return out


def first_error(log: Path) -> str:
    """The first line of a run's log that names an exception (torchrun's summary is noise)."""
    if not log.is_file():
        return ""
    for line in log.read_text(errors="replace").splitlines():
        if re.search(r"\b\w*(Error|Exception)\b: ", line):
            return line.strip()[:400]
    return ""


def efficiencies(rows: list[dict[str, Any]]) -> None:
    """Fill tokens/s per GPU and scaling efficiency against the successful 1-GPU run."""
    base = next(
        (r for r in rows if r.get("gpus") == 1 and "tokens_per_s" in r and not r.get("fsdp")),
        None,
    )
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / row["gpus"]
        if base is not None:
            row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s"]


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
    }


def cmd_init(args: argparse.Namespace) -> int:
    """Write the JSON's header, then tokenize the corpus (once: training runs reuse the cache)."""
    from foldformer.data.cache import tokenize_corpus
    from foldformer.data.tokenizers import load_tokenizer

    results = {
        **environment(),
        "what": "weak scaling of `foldformer train` under torchrun: same rows per GPU",
        "data": args.data,
        "command_line": args.command_line,
        "settings": json.loads(args.settings) if args.settings else {},
        "throughput_definition": __doc__.split("Throughput of a run: ")[1].strip(),
        "runs": [],
    }
    write(Path(args.out), results)
    corpus = tokenize_corpus(
        [args.data], load_tokenizer(args.tokenizer), args.cache_dir, progress=False
    )
    print(f"{'reused' if corpus.reused else 'built'} token cache: {corpus}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    out = Path(args.out)
    results = json.loads(out.read_text())
    row: dict[str, Any] = {
        "label": args.label, "gpus": args.gpus, "fsdp": args.fsdp, "rc": args.rc,
        "wall_seconds": args.seconds, "command": args.command,
    }  # fmt: skip
    run_dir = Path(args.run_dir)
    config_path = run_dir / "run_config.json"
    if config_path.is_file():
        train = json.loads(config_path.read_text())["train"]
        row.update(per_gpu_batch=train["batch_size"], seq_len=train["seq_len"],
                   compile=train["compile"], max_steps=train["max_steps"])  # fmt: skip
    if args.skipped:
        row["skipped"] = args.skipped
    else:
        try:
            row.update(run_throughput(run_dir / "metrics.jsonl"))
        except (OSError, ValueError) as error:
            row["error"] = str(error)
        if args.rc != 0:  # a timeout (124) may still have logged enough intervals
            what = "timed out" if args.rc in (124, 137) else f"exit status {args.rc}"
            found = first_error(Path(args.log)) if args.log else ""
            row["error"] = "; ".join(p for p in (what, row.get("error", ""), found) if p)[:900]
    results["runs"].append(row)
    efficiencies(results["runs"])
    write(out, results)
    shown = {k: row[k] for k in ("label", "gpus", "tokens_per_s", "scaling_efficiency") if k in row}
    print(json.dumps(shown if "error" not in row else {**shown, "error": row["error"][:200]}))
    return 0


def write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def print_table(path: Path) -> None:
    results = json.loads(path.read_text())
    print(f"{results['device']}, torch {results['torch']}")
    print(f"{'run':6} {'gpus':>4} {'tokens/s':>10} {'per GPU':>10} {'efficiency':>10}  note")
    for row in results["runs"]:
        note = (row.get("skipped") or row.get("error", ""))[:80]
        if "tokens_per_s" not in row:
            print(f"{row['label']:6} {row['gpus']:>4} {note}")
            continue
        eff = row.get("scaling_efficiency")
        print(
            f"{row['label']:6} {row['gpus']:>4} {row['tokens_per_s']:>10.0f} "
            f"{row['tokens_per_s_per_gpu']:>10.0f} {'-' if eff is None else f'{eff:.3f}':>10}"
            f"  {note}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    init = commands.add_parser("init", help="start the results JSON, build the token cache")
    init.add_argument("out")
    init.add_argument("--data", required=True)
    init.add_argument("--cache_dir", required=True)
    init.add_argument("--tokenizer", default="bytes")
    init.add_argument("--command-line", default="")
    init.add_argument("--settings", help="JSON object of the run settings")
    record = commands.add_parser("record", help="add one run's row")
    record.add_argument("out")
    record.add_argument("--label", required=True)
    record.add_argument("--gpus", type=int, required=True)
    record.add_argument("--fsdp", action="store_true")
    record.add_argument("--run-dir", required=True)
    record.add_argument("--rc", type=int, default=0)
    record.add_argument("--seconds", type=float, default=0.0)
    record.add_argument("--command", default="")
    record.add_argument("--log")
    record.add_argument("--skipped")
    table = commands.add_parser("table", help="print the results as a table")
    table.add_argument("out")
    args = parser.parse_args(argv)
    if args.action == "table":
        print_table(Path(args.out))
        return 0
    return {"init": cmd_init, "record": cmd_record}[args.action](args)


if __name__ == "__main__":
    raise SystemExit(main())
