"""Context horizon against ECL on the `seed` models (issue 16, item 4; docs/explain.md).

benchmarks/explain_seed.sh trains the models and measures their ECL, then runs, per model
(and per way of carrying the gate, foldformer.explain.GATES):

    python benchmarks/explain_seed.py measure RUN/final --name folded --gate mean \
        --data 'pg.tar.xz?split=validation' --ecl RESULTS/folded/ecl.json --out part.json
    python benchmarks/explain_seed.py report OUT part.json ...  # explain_seed.json, .png

measure: --targets windows of the held-out documents, each at least --context tokens into its
document (drawn as ECL draws its targets, `select_targets`). For each, the model reads a fresh
stream of the --context tokens before the window and the window's first tokens, as ECL's run
at d = --context does, and `foldformer.explain` gives the path amplitude (heads averaged) of
the window's predictions at --offsets. Per position: the context horizons (50/90/99%, tokens
back from the position), the share that ended in the initial memory, and the amplitude in the
bins of the ECL grid counted back from the window's start: "window" (its own tokens), then
(d_(k-1), d_k], the tokens that ECL's step from context d_(k-1) to d_k adds, and the rest.

report: per model its ECL curve (from its ecl.json) and, for each d of the grid, the share of
amplitude beyond d (on the tokens that ECL's run at context d does not see) next to the share
of the loss drop still to come beyond d, (loss_d - loss_Dmax) / (loss_0 - loss_Dmax).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from foldformer.evaluate.common import load_checkpoint, new_figure, resolve_device, save_figure
from foldformer.evaluate.ecl import WINDOW, select_targets
from foldformer.evaluate.records import code_version, hardware, model_config
from foldformer.evaluate.suite import HeldOutDocuments
from foldformer.explain import GATES, HORIZON_SHARES, Amplitude, Explainer


def bin_edges(grid: list[int], context: int) -> list[int]:
    """Bin edges back from the window start: the ECL grid's d > 0, then the whole context."""
    return [d for d in grid if 0 < d < context] + [context]


def bin_names(edges: list[int]) -> list[str]:
    return ["window"] + [
        f"({low}, {high}]" for low, high in zip([0, *edges[:-1]], edges, strict=True)
    ]


def amplitude_bins(record: Amplitude, window_start: int, edges: list[int]) -> list[float]:
    """The amplitude of one position in the window's own tokens, then in each bin (low, high]
    of tokens back from window_start (1 = the token just before the window)."""
    a = record.amplitude
    back = torch.cat([a.new_zeros(1), a[:window_start].flip(0).cumsum(0)])  # held within b back
    held = [float(back[min(edge, window_start)]) for edge in edges]
    return [float(a[window_start:].sum())] + [
        high - low for low, high in zip([0.0, *held[:-1]], held, strict=True)
    ]


def share_beyond(bins: list[float]) -> list[float]:
    """For d = 0 and each edge but the last: the share on tokens more than d before the window."""
    return [sum(bins[k + 1 :]) for k in range(len(bins) - 1)]


def read_ecl(path: str | Path) -> dict:
    """ECL, its interval and curve, and the control's content gain, from an ecl.json."""
    records = json.loads(Path(path).read_text())
    ecl = next(r for r in records if r["metric"] == "ecl")
    curve = ecl["extra"]["curve"]
    loss = [point["loss"] for point in curve]
    drop = loss[0] - loss[-1]
    control = [r["value"] for r in records if r["metric"] == "context_content_gain"]
    return {
        "ecl": ecl["value"],
        "ecl_interval": ecl["interval"],
        "targets": ecl["extra"]["n_targets"],
        "distances": [point["distance"] for point in curve],
        "loss": loss,
        "loss_interval": [point["loss_interval"] for point in curve],
        "content_gain": control or None,
        # the loss drop from d = 0 to D_max still to come beyond d (1 at d = 0, 0 at D_max)
        "loss_share_beyond": [(x - loss[-1]) / drop if drop else 0.0 for x in loss],
    }


def measure(model, documents: list, grid: list[int], context: int, targets: int,
            offsets: list[int], gate: str, seed: int = 0, budget_s: float = 0.0) -> dict:  # fmt: skip
    """Explain `offsets` of the window of up to `targets` targets (fewer if budget_s runs out
    after a target): one record per position, and their summary."""
    edges = bin_edges(grid, context)
    chosen = select_targets([ids for _, ids in documents], targets, context, seed)
    records, started = [], time.time()
    for doc, start in chosen:
        stream = documents[doc][1][start - context : start + max(offsets) + 1]
        explainer = Explainer(model, [context + j for j in offsets], gate=gate)
        explainer.read(torch.as_tensor(stream.astype("int64")))
        for j, record in zip(offsets, explainer.amplitudes(), strict=True):
            records.append({
                "document": documents[doc][0], "window_start": start, "offset": j,
                "horizon": [record.horizon(s) for s in HORIZON_SHARES],
                "initial_memory": record.initial_memory,
                "bins": amplitude_bins(record, context, edges),
            })  # fmt: skip
        if budget_s and time.time() - started > budget_s:
            break
    n_targets = len(records) // len(offsets)
    return {"gate": gate, "context": context, "offsets": offsets, "targets_asked": targets,
            "targets": n_targets, "seconds": round(time.time() - started, 1),
            "bin_names": bin_names(edges), "bin_edges": edges,
            "summary": summarise(records, edges), "records": records}  # fmt: skip


def summarise(records: list[dict], edges: list[int]) -> dict:
    """Means over the positions; horizons also as medians and quartiles."""
    n = len(records)
    bins = [sum(r["bins"][k] for r in records) / n for k in range(len(edges) + 1)]
    widths = [high - low for low, high in zip([0, *edges[:-1]], edges, strict=True)]
    horizons = {}
    for i, share in enumerate(HORIZON_SHARES):
        values = sorted(r["horizon"][i] for r in records)
        quartiles = statistics.quantiles(values, n=4) if n > 1 else values * 3
        horizons[f"{round(100 * share)}%"] = {
            "mean": sum(values) / n, "median": statistics.median(values),
            "quartiles": [quartiles[0], quartiles[2]],
        }  # fmt: skip
    return {
        "positions": n,
        "horizon": horizons,
        "initial_memory": sum(r["initial_memory"] for r in records) / n,
        "bin_share": bins,
        # mean amplitude per token of each bin before the window (the window's own: None)
        "bin_per_token": [None] + [b / w for b, w in zip(bins[1:], widths, strict=True)],
        "share_beyond": dict(zip(["0", *map(str, edges[:-1])], share_beyond(bins), strict=True)),
    }


def plot(models: dict, path: Path) -> None:
    """Left: loss against context (own solid, unrelated dashed), ECL marked; right: the share
    of amplitude beyond d (solid, per gate) and of the loss drop still to come (dashed)."""
    fig, (left, right) = new_figure(1, 2, figsize=(12, 4.5))
    for color, (name, model) in zip(("tab:blue", "tab:orange"), models.items(), strict=False):
        ecl = model["ecl"]
        d = ecl["distances"]
        left.plot(d, ecl["loss"], "o-", color=color, label=f"{name}: ECL {ecl['ecl']}")
        if ecl["content_gain"]:
            other = [x + g for x, g in zip(ecl["loss"], ecl["content_gain"], strict=True)]
            left.plot(d, other, "s--", color=color, alpha=0.5, label=f"{name}: unrelated context")
        if ecl["ecl"]:
            left.axvline(ecl["ecl"], color=color, ls=":")
            right.axvline(ecl["ecl"], color=color, ls=":")
        keep = [(x, s) for x, s in zip(d, ecl["loss_share_beyond"], strict=True) if x and s > 0]
        right.plot([x for x, _ in keep], [s for _, s in keep], "s--", color=color,
                   label=f"{name}: loss drop still to come")  # fmt: skip
        for style, (gate, part) in zip(("o-", "^-."), model["explain"].items(), strict=False):
            beyond = part["summary"]["share_beyond"]
            points = [(int(k), v) for k, v in beyond.items() if int(k) and v > 0]
            h90 = part["summary"]["horizon"]["90%"]["median"]
            right.plot([x for x, _ in points], [v for _, v in points], style, color=color,
                       label=f"{name} ({gate}): amplitude, median h90 {h90:g}")  # fmt: skip
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=12)
        ax.set_xlabel("context d (tokens before the target window)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("loss on the window (nats/byte)")
    right.set_yscale("log")
    right.set_ylabel("share beyond d")
    left.set_title("ECL: loss against context (validation authors)")
    right.set_title("path amplitude beyond d, and the loss drop beyond d")
    save_figure(fig, path)


def report(out: Path, parts: list[Path], commands: list[str]) -> dict:
    models: dict = {}
    for path in parts:
        part = json.loads(path.read_text())
        keys = ("ecl", "training", "model_config")
        model = models.setdefault(part["name"], {k: part[k] for k in keys})
        model.setdefault("explain", {})[part["gate"]] = part["explain"]
    first = json.loads(parts[0].read_text())
    meta = {k: first[k] for k in ("hardware", "code_version")}
    result = {
        "what": "issue 16 item 4: context horizon against ECL on the seed models "
                "(benchmarks/explain_seed.py, docs/explain.md)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": 0, "commands": commands, **meta, "models": models,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain_seed.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(models, out / "explain_seed.png")
    for name, model in models.items():
        ecl = model["ecl"]
        print(f"== {name}: ECL {ecl['ecl']} {ecl['ecl_interval']}; final val loss "
              f"{model['training'].get('final_val_loss')}; steps {model['training'].get('steps')}")  # fmt: skip
        print("   d            " + " ".join(f"{d:>8}" for d in ecl["distances"]))
        print("   loss         " + " ".join(f"{x:8.4f}" for x in ecl["loss"]))
        print("   loss beyond  " + " ".join(f"{x:8.4f}" for x in ecl["loss_share_beyond"]))
        for gate, part in model["explain"].items():
            s = part["summary"]
            beyond = [s["share_beyond"].get(str(d)) for d in ecl["distances"]]
            print("   amp. beyond  " + " ".join("       –" if b is None else f"{b:8.2e}" for b in beyond)
                  + f"   ({gate}; {part['targets']} targets x {len(part['offsets'])} positions, "
                  f"{part['seconds']} s)")  # fmt: skip
            print("   horizons (median 50/90/99%): "
                  + " / ".join(f"{v['median']:g}" for v in s["horizon"].values())
                  + f"; initial memory {s['initial_memory']:.2e}")  # fmt: skip
    return result


def measure_part(args) -> dict:
    """`measure`: one model and gate, with the model's ECL and training summary."""
    device = resolve_device(args.device)
    model, tokenizer = load_checkpoint(args.checkpoint, device)
    documents = HeldOutDocuments(args.data, tokenizer, args.cache_dir, progress=False)
    ecl = read_ecl(args.ecl)
    training = {}
    if args.run:
        training = json.loads((Path(args.run) / "summary.json").read_text())
        training["run_config"] = json.loads((Path(args.run) / "run_config.json").read_text())
    kept = documents.tokens(args.context + WINDOW, " for --context and the window")
    explained = measure(model, kept, ecl["distances"], args.context, args.targets, args.offsets,
                        args.gate, budget_s=args.budget_s)  # fmt: skip
    return {"name": args.name, "gate": args.gate, "ecl": ecl, "training": training,
            "model_config": model_config(model), "explain": explained,
            "hardware": hardware(device), "code_version": code_version()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("checkpoint")
    m.add_argument("--name", required=True)
    m.add_argument("--data", nargs="+", required=True, help="held-out documents (data specs)")
    m.add_argument("--ecl", required=True, help="the model's ecl.json (its curve and grid)")
    m.add_argument("--run", help="the training run's folder (summary.json, run_config.json)")
    m.add_argument("--gate", default="mean", help="foldformer.explain.GATES")
    m.add_argument("--context", type=int, default=8192, help="tokens before each window")
    m.add_argument("--targets", type=int, default=48)
    m.add_argument("--offsets", type=int, nargs="+", default=list(range(0, WINDOW - 1, 8)),
                   help="the explained positions, as offsets into the window")  # fmt: skip
    m.add_argument("--budget-s", type=float, default=0.0, help="stop after the target past it")
    m.add_argument("--cache-dir", default=None)
    m.add_argument("--device", default="auto")
    m.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("out")
    r.add_argument("parts", nargs="+")
    r.add_argument("--command", dest="commands", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "report":
        report(Path(args.out), [Path(p) for p in args.parts], args.commands)
        return
    if args.gate not in GATES:
        parser.error(f"--gate {args.gate!r} is not one of {GATES}")
    if args.context < 1 or not all(0 <= j < WINDOW for j in args.offsets):
        parser.error(f"--context must be >= 1 and --offsets in 0..{WINDOW - 1}")
    part = measure_part(args)
    Path(args.out).write_text(json.dumps(part) + "\n")
    explained = part["explain"]
    print(f"{args.name} ({args.gate}): {explained['targets']} targets in {explained['seconds']} s; "
          f"median horizons {[v['median'] for v in explained['summary']['horizon'].values()]}")  # fmt: skip


if __name__ == "__main__":
    main()
