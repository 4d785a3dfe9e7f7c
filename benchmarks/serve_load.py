"""A bounded load test of `foldformer serve` on loopback: S concurrent sessions, each sending R
requests one after another (appends and generations alternating), then throughput, latency
percentiles and the server's batch sizes (rows per batch and per decode step, from /healthz)
to JSON. Starts its own server (a tiny random model unless --checkpoint), stops it and itself
when done or after --timeout seconds.

    PYTHONPATH=src python benchmarks/serve_load.py --out benchmarks/results/cpu_serve/serve_load.json
        [--checkpoint DIR] [--sessions 32] [--requests 20] [--max-new-tokens 16]
        [--append-chars 200] [--timeout 600] [--device cpu] [--threads N]
        [--batch-window-ms MS] [--max-batch N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_checkpoint(directory: Path) -> Path:
    import torch

    from foldformer.data.tokenizers import ByteTokenizer
    from foldformer.models import build_model

    torch.manual_seed(0)
    shape = dict(vocab_size=257, d_model=64, n_layers=2, n_heads=2, segment_len=32, memory_len=32)
    build_model("folded", shape).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict:
    return {"requests": len(latencies),
            "p50_ms": round(1000 * percentile(latencies, 50), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1)}  # fmt: skip


async def one_session(client, index: int, args, latencies: dict, errors: list) -> None:
    async def call(kind: str, path: str, body: dict) -> dict | None:
        start = time.perf_counter()
        response = await client.post(path, json=body)
        latencies.setdefault(kind, []).append(time.perf_counter() - start)
        if response.status_code >= 400:
            errors.append(f"{kind} {response.status_code} {response.text[:200]}")
            return None
        return response.json()

    created = await call("create", "/v1/sessions", {"text": f"Session {index}. " * 10})
    if created is None:
        return
    sid = created["id"]
    for i in range(args.requests):
        if i % 2 == 0:
            text = f" Note {i} of session {index}: " + "lorem ipsum " * (args.append_chars // 12)
            await call("append", f"/v1/sessions/{sid}/append", {"text": text})
        else:
            body = {"prompt": " Q:", "max_new_tokens": args.max_new_tokens, "seed": i,
                    "stop_at_eod": False, "commit": i % 4 == 1}  # fmt: skip
            await call("generate", f"/v1/sessions/{sid}/generate", body)


async def load(base: str, args) -> dict:
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout) as client:
        start = time.perf_counter()
        sessions = (one_session(client, i, args, latencies, errors) for i in range(args.sessions))
        try:
            await asyncio.wait_for(asyncio.gather(*sessions), args.timeout)
            timed_out = False
        except TimeoutError:  # what finished so far is still reported
            timed_out = True
        wall = time.perf_counter() - start
    every = [t for kind in latencies.values() for t in kind]
    generated = len(latencies.get("generate", [])) * args.max_new_tokens
    return {
        "wall_s": round(wall, 2),
        "timed_out": timed_out,
        "requests": len(every),
        "errors": len(errors),
        "first_errors": errors[:5],
        "requests_per_s": round(len(every) / wall, 2),
        "generated_tokens_per_s": round(generated / wall, 1),
        "all": summary(every) if every else None,
        **{kind: summary(values) for kind, values in latencies.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="per session, after creating it")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--append-chars", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="server's torch threads (0: default)"
    )
    parser.add_argument("--batch-window-ms", type=float, help="the server's (default: its own)")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp) / "tiny")
        port = free_port()
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        server = subprocess.Popen(
            [sys.executable, "-m", "foldformer.cli", "serve", str(checkpoint), "--port",
             str(port), "--db", str(Path(tmp) / "load.sqlite"), "--device", args.device,
             "--max-batch", str(args.max_batch)]
            + ([] if args.batch_window_ms is None else
               ["--batch-window-ms", str(args.batch_window_ms)]),
            env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.2)
            result = asyncio.run(load(base, args))
            result["batching"] = httpx.get(f"{base}/healthz").json()["batching"]
        finally:
            server.terminate()
            server.wait(30)
    record = {
        "benchmark": "serve_load",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "device": args.device,
        "server_threads": args.threads or "default",
        "checkpoint": args.checkpoint or "tiny random folded model (d 64, 2 layers, w = m = 32)",
        "sessions": args.sessions,
        "requests_per_session": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "append_chars": args.append_chars,
        **result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0 if result["errors"] == 0 and not result["timed_out"] else 1


if __name__ == "__main__":
    sys.exit(main())
