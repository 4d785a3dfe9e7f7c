"""A pretrained decoder made here, then folded (issue 15, item 4), on one GPU in about 7 minutes.

    PYTHONPATH=src python3 benchmarks/hf_fold_gpu.py PG_ARCHIVE OUT
    SMOKE=1 PYTHONPATH=src python3 benchmarks/hf_fold_gpu.py PG_ARCHIVE OUT   # CPU, toy sizes

1. pretrain: a Llama-shaped Hugging Face decoder (RMSNorm, rotary, SwiGLU; the seed preset's
   d = 384, 6 layers, bytes) with full attention over 512 tokens on the pg training authors,
   written as a Hugging Face checkpoint (/tmp/hf_fold_runs/hf_pretrained, not copied to OUT);
2. from it, at the same tokens per step and the same number of fine-tuning steps:
   folded (fold, w = m = 64, BPTT over the 16 folds of a 1024-token row), the RMT wrapping
   (64 memory tokens, w = 64) and the unfolded decoder trained on (full attention, 512);
3. a folded model of the same shape from scratch, for as many tokens as pretraining plus
   fine-tuning (matched tokens);
4. for each, plus the pretrained decoder itself: ECL (grid unit 64 for every model) and
   held-out bits per byte / loss on the validation authors, by the suite `foldformer eval ecl`
   and `foldformer eval lm` run (foldformer.evaluate.suite), in this process.

Every training stage is a `foldformer train` command (listed in OUT/hf_fold.json with its wall
time); each has a time cap so the whole run ends within the GPU slot: a stage stopped by its
cap saw fewer tokens, which the summary says ("tokens", "matched_tokens"; then rerun with
fewer steps, e.g. PRE_STEPS=200 FT_STEPS=100, for matched tokens, or rerun that stage
alone with a longer cap, e.g. STAGES=scratch CAP_SCRATCH=3). Writes
OUT/hf_fold.json (the table) and OUT/hf_fold_records.tar.gz (every record, log and
metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SMOKE = os.environ.get("SMOKE") == "1"
FOLDFORMER = [sys.executable, "-m", "foldformer.cli"]

if SMOKE:  # CPU, seconds: the same stages at toy size
    SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    WINDOW, W, M, ROWS, PRE_STEPS, FT_STEPS = 64, 8, 8, 4, 4, 2
    COMMON = ["--device", "cpu", "--eval_every", "0", "--log_every", "1"]
    CAPS = dict.fromkeys(("pretrain", "unfolded", "folded", "rmt", "scratch"), 3.0)
    EVAL = dict(ecl_targets=16, ecl_max_distance=64, ecl_unit=8, ecl_batch_size=16,
                lm_max_documents=2, lm_max_tokens=256)  # fmt: skip
    EVAL_DEVICE = "cpu"
else:
    SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=6)  # fmt: skip
    # 131,072 tokens a step everywhere: pretraining rows of 512, folded rows of 1024
    WINDOW, W, M, ROWS = 512, 64, 64, 256
    # PRE_STEPS=N / FT_STEPS=N in the environment: fewer steps where a stage met its cap
    PRE_STEPS = int(os.environ.get("PRE_STEPS", 300))
    FT_STEPS = int(os.environ.get("FT_STEPS", 150))
    COMMON = ["--eval_every", "0", "--log_every", "10"]
    # minutes, 5.1 in all: a stage past its cap stops early and the summary says so
    CAPS = dict(pretrain=1.0, unfolded=0.5, folded=0.8, rmt=1.0, scratch=1.8)
    EVAL = dict(ecl_targets=512, ecl_max_distance=2048, ecl_unit=64, ecl_batch_size=256,
                lm_max_documents=12, lm_max_tokens=8192)  # fmt: skip
    EVAL_DEVICE = "cuda"

# CAP_SCRATCH=3 etc. in the environment: another cap for a stage; STAGES=scratch: only those
# stages (the decoder from scratch needs no pretraining), e.g. to rerun one that met its cap
CAPS |= {k: float(os.environ[f"CAP_{k.upper()}"]) for k in CAPS if f"CAP_{k.upper()}" in os.environ}
STAGES = os.environ.get("STAGES", ",".join(CAPS)).split(",")
if unknown := set(STAGES) - set(CAPS):
    sys.exit(f"STAGES: unknown stage {sorted(unknown)[0]!r} (stages: {', '.join(CAPS)})")
if "pretrain" not in STAGES and set(STAGES) & {"unfolded", "folded", "rmt"}:
    sys.exit("STAGES: unfolded, folded and rmt start from the pretrained decoder: add pretrain")


def run(command: list[str], log: Path) -> float:
    """Run one foldformer command, its output in `log`; its wall time in seconds."""
    print("$", " ".join(command), flush=True)
    start = time.time()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return time.time() - start


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: hf_fold_gpu.py PG_ARCHIVE OUT")
    archive, out = Path(sys.argv[1]), Path(sys.argv[2])
    if not archive.is_file():
        sys.exit(f"no pg archive at {archive}")
    work = Path("/tmp/hf_fold_runs" + ("_smoke" if SMOKE else ""))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    train_data = ["--data", f"{archive}?split=train", "--cache_dir", str(work / "cache")]
    validation = f"{archive}?split=validation"
    commands: list[dict] = []

    def train(name: str, minutes: float, *options: str) -> dict:
        shutil.rmtree(work / name, ignore_errors=True)  # a fresh run, not a resume
        command = [*FOLDFORMER, "train", *train_data, *COMMON, "--progress", "false",
                   "--save_every", "0", "--max-minutes", str(minutes),
                   "--out", str(work / name), *options]  # fmt: skip
        seconds = run(command, work / f"{name}.train.log")
        commands.append({"stage": f"train {name}", "command": command, "seconds": seconds})
        return json.loads((work / name / "summary.json").read_text()) | {"train_seconds": seconds}

    # 1. a random Llama-shaped decoder, pretrained with full attention over WINDOW tokens
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, max_position_embeddings=WINDOW, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=256, **SHAPE)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "hf_init")
    steps = lambda n: ["--max-steps", str(n)]  # noqa: E731
    full = ["--memory_len", "0", "--segment_len", str(WINDOW), "--seq_len", str(WINDOW),
            "--batch_size", str(ROWS)]  # fmt: skip
    folded = ["--memory_len", str(M), "--segment_len", str(W), "--seq_len", str(2 * WINDOW),
              "--batch_size", str(ROWS // 2)]  # fmt: skip
    summaries = {}
    if "pretrain" in STAGES:
        summaries["unfolded"] = train(
            "pretrain", CAPS["pretrain"], "--model_type", "hf_folded", "--hf_model",
            str(work / "hf_init"), *full, *steps(PRE_STEPS), "--lr", "1e-3",
            "--warmup_steps", "30",
        )  # fmt: skip
        from foldformer.models import load_model

        hf_dir = work / "hf_pretrained"  # the pretrained decoder as a Hugging Face checkpoint
        load_model(work / "pretrain" / "final").decoder.save_pretrained(hf_dir)
        AutoModelForCausalLM.from_pretrained(hf_dir)  # loads back as a plain Hugging Face model

        # 2. three ways on from it, same steps at the same tokens a step
        tune = [*steps(FT_STEPS), "--lr", "5e-4", "--warmup_steps", "10", "--hf_model",
                str(hf_dir)]  # fmt: skip
        for stage, name, options in (("unfolded", "unfolded_continued", ["hf_folded", *full]),
                                     ("folded", "pretrained_folded", ["hf_folded", *folded]),
                                     ("rmt", "pretrained_rmt", ["hf_rmt", *folded])):  # fmt: skip
            if stage in STAGES:
                summaries[name] = train(name, CAPS[stage], "--model_type", *options, *tune)
    # 3. folded from scratch for the tokens of pretraining plus fine-tuning
    if "scratch" in STAGES:
        summaries["scratch_folded"] = train(
            "scratch_folded", CAPS["scratch"], "--model_type", "hf_folded", "--hf_model",
            str(work / "hf_init"), *folded, *steps(PRE_STEPS + FT_STEPS), "--lr", "1e-3",
            "--warmup_steps", "30",
        )  # fmt: skip
    if "pretrained_folded" in summaries:
        summaries["pretrained_folded"]["tokens_with_pretraining"] = (
            summaries["unfolded"]["tokens"] + summaries["pretrained_folded"]["tokens"]
        )

    # 4. ECL and held-out loss of every model: the suite `foldformer eval ecl` / `eval lm` run
    # (foldformer.evaluate.suite), in this process so the held-out text is read once
    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.evaluate.records import write_records
    from foldformer.evaluate.suite import EvalSettings, HeldOutDocuments, evaluate_model

    settings = EvalSettings(run=["ecl", "lm"], **EVAL)
    documents = HeldOutDocuments([validation], ByteTokenizer(), work / "cache", progress=False)
    runs = {k: "pretrain" if k == "unfolded" else k for k in summaries}
    rows = {}
    for name, directory in runs.items():
        start = time.time()
        records = evaluate_model(name, work / directory / "final", settings, documents,
                                 torch.device(EVAL_DEVICE), progress=False)  # fmt: skip
        write_records(records, work / directory / "eval.json")
        commands.append({"stage": f"eval {name}", "seconds": time.time() - start})
        found = {r["metric"]: r for r in records}
        rows[name] = {
            **summaries[name],
            "ecl": found["ecl"]["value"],
            "ecl_interval": found["ecl"]["interval"],
            "loss_at_context": {c["distance"]: c["loss"] for c in found["ecl"]["extra"]["curve"]},
            "held_out_bits_per_byte": found["bits_per_byte"]["value"],
            "held_out_bits_per_byte_interval": found["bits_per_byte"]["interval"],
            "held_out_loss_per_token": found["loss_per_token"]["value"],
        }
    fine_tunes = {rows[k]["tokens"] for k in ("unfolded_continued", "pretrained_folded",
                                              "pretrained_rmt") if k in rows}  # fmt: skip
    scratch = rows.get("scratch_folded", {}).get("tokens")
    # tokens of pretraining plus fine-tuning: as trained here, else as planned (PRE_STEPS +
    # FT_STEPS steps at the same tokens a step) for a scratch-only rerun
    planned = rows.get("pretrained_folded", {}).get(
        "tokens_with_pretraining", (PRE_STEPS + FT_STEPS) * ROWS * WINDOW
    )
    summary = {
        "what": "issue 15 item 4: a Llama-shaped decoder pretrained here (full attention), "
        "folded and fine-tuned with BPTT, against the unfolded decoder, the RMT wrapping and "
        "a folded model from scratch at matched tokens",
        "smoke": SMOKE,
        "stages": STAGES,
        "caps_minutes": CAPS,
        "shape": SHAPE | {"vocab_size": 257, "tokenizer": "bytes"},
        "folds": {"segment_len": W, "memory_len": M, "pretraining_window": WINDOW},
        "eval": settings.to_dict(),
        "matched_tokens": {
            "fine_tunes": len(fine_tunes) <= 1,
            "scratch_vs_pretrained_plus_fine_tune": scratch == planned,
        },
        "models": rows,
        "commands": commands,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "hf_fold.json").write_text(json.dumps(summary, indent=2) + "\n")
    with tarfile.open(out / "hf_fold_records.tar.gz", "w:gz") as tar:
        for path in sorted(work.glob("*.train.log")):
            tar.add(path, arcname=f"logs/{path.name}")
        for directory in runs.values():
            for name in ("summary.json", "metrics.jsonl", "run_config.json"):
                tar.add(work / directory / name, arcname=f"{directory}/{name}")
            tar.add(work / directory / "eval.json", arcname=f"{directory}/eval.json")
    table = [f"{'model':20} {'tokens':>12} {'ECL':>6} {'bits/byte':>9}"]
    table += [f"{k:20} {v['tokens']:>12,} {v['ecl']:>6} {v['held_out_bits_per_byte']:>9.4f}"
              for k, v in rows.items()]  # fmt: skip
    print("\n".join(table))
    print(f"wrote {out / 'hf_fold.json'} and {out / 'hf_fold_records.tar.gz'}")


if __name__ == "__main__":
    main()
