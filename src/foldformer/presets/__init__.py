"""Named starting points for a run (`foldformer train --preset NAME`): a model shape and its
training settings. Kept apart from the trainer, so benchmarks get a shape without importing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, minutes: byte-level, w = m = 8, gated memory (the demo's model).
    "tiny": {
        "model": dict(model_type="folded", d_model=64, n_layers=2, n_heads=4,
                      segment_len=8, memory_len=8, memory_gate=True),
        "train": dict(batch_size=32, seq_len=128, lr=1e-3, warmup_steps=20, max_steps=1000,
                      eval_every=100, eval_batches=4, save_every=200),
    },
    # The note's set-up: w = m = 12, a small GPT, byte-level (as the reference runs;
    # presets/seed_bpe8192.json is a BPE trained on the pg training authors, for --tokenizer).
    # 64 folds of backpropagation a step over 1024 rows (a 24-position fold costs the same
    # time from 256 to 1024 rows); 360 steps = 283M bytes, 2.4 epochs of the pg training
    # authors, about 6 minutes on an H200: held-out ECL 192 bytes, with --memory_gate true at
    # least 6144 (docs/results.md, round 4).
    "seed": {
        "model": dict(model_type="folded", d_model=384, n_layers=6, n_heads=6,
                      segment_len=12, memory_len=12),
        "train": dict(batch_size=1024, seq_len=768, lr=1e-3, warmup_steps=30, max_steps=360,
                      checkpoint_folds=True, compile=True, eval_every=90, save_every=90),
        "data": dict(tokenizer="bytes"),
    },
    # Passkey retrieval (docs/retrieval.md, round 7): w = m = 128, the clamp_st gate, the §6
    # passkey with the curriculum from 1 to 128 folds (prompts of at most 16K tokens), every
    # row's filler shuffled, mixed-in batches of any shorter length, half the answers across a
    # fold. 6 minutes on an H200 (add --compile true there): seed 0 answered 100% at 1M tokens
    # at every depth, seed 1 99%.
    "passkey": {
        "model": dict(model_type="folded", d_model=128, n_layers=2, n_heads=4,
                      segment_len=128, memory_len=128, memory_gate=True,
                      gate_activation="clamp_st"),
        "train": dict(batch_size=128, seq_len=128, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0,
                      weight_decay=0.0, beta2=0.999, max_steps=1_000_000, max_minutes=6.0,
                      eval_every=0, save_every=250, log_every=25),
        "data": dict(train=["synthetic:passkey?n_folds=1&max_folds=128&mix=0.5&window=256"
                            "&uniform=true&shuffle=true&straddle=0.5"]),
    },
    # GPU throughput: GPT-2-small shape, w = m = 512.
    "base": {
        "model": dict(model_type="folded", d_model=768, n_layers=12, n_heads=12,
                      segment_len=512, memory_len=512, activation="gelu"),
        "train": dict(batch_size=32, seq_len=2048, lr=6e-4, warmup_steps=500, max_steps=20000,
                      checkpoint_folds=True, eval_every=1000, save_every=2000),
    },
}  # fmt: skip
