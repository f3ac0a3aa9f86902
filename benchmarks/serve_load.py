"""Serving under load: the hybrid server (the router picks per request) against the think view alone.

    python benchmarks/serve_load.py                    # outputs/router/final, 8 clients, the 320 evaluation prompts
    python benchmarks/serve_load.py --checkpoint DIR --clients 16 --prompts 200 engine.dtype=float32

Sends the held-out synthetic mix of recipes/evaluate.py (seed 1: multi-step math, one-step arith,
extract) as chat requests from N concurrent clients (the openai client's async API), greedy, as the
router stage and the evaluation decode, to two servers (recipes/serve.py) in turn, on the same hardware:
- hybrid: `"expert": "auto"`, the router picks; each engine has its half of the CPU cores (the default
  engine.cpu_threads_bind=split; on a GPU both engines share it);
- think_only: `"expert": "think"` on a server whose engines are bound to all the cores: the think view alone
  on the whole machine, the fast engine idle (no router forward).
A checkpoint whose think expert is a LoRA over fast is served by one engine (`hybrid_one_engine`:
engine.lora_engine=adapter, the fast view with think's adapter per request) and by two (`hybrid`:
engine.lora_engine=merged, the adapter merged into a think view of its own, each engine on half the cores);
think_only is then the merged think view alone.
Each server gets a warm-up request to each expert first. Extra `key=value` arguments go to both servers.

Prints one JSON object: per mode requests/s, p50 and p95 latency, thinking ratio (overall and per
data_source) and mean generated tokens per request, and the hybrid-to-think-alone ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = {"hybrid": "auto", "hybrid_one_engine": "auto", "think_only": "think"}


def start_server(checkpoint: str, out: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "recipes" / "serve.py"), f"checkpoint={checkpoint}", "port=0",
           f"output_dir={out}", "log_every_s=0", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (out / "server.json").is_file():
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped (rc {proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(1)
    return proc, json.loads((out / "server.json").read_text())["url"]


def eval_prompts(n: int, folder: Path) -> list[dict]:
    """The evaluation's default rows (recipes/evaluate.py's synthetic mix), the first n."""
    from home_rl.router.config import EvaluateConfig
    from home_rl.trainer.router_data import synthetic_mix

    path = Path(synthetic_mix(EvaluateConfig().synthetic, folder))
    return [json.loads(line) for line in path.read_text().splitlines()][:n]


async def load(url: str, rows: list[dict], expert: str, clients: int, max_tokens: int) -> list[dict]:
    """Every row once, from `clients` concurrent clients; one record per request."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    records: list[dict] = []

    async def one_client():
        while not queue.empty():
            row = queue.get_nowait()
            start = time.perf_counter()
            reply = await client.chat.completions.create(
                model="home", messages=[{"role": "user", "content": row["prompt"]}], temperature=0,
                max_tokens=max_tokens, extra_body={"expert": expert})
            records.append({"source": row["data_source"], "expert": reply.model_extra["home"]["expert"],
                            "latency_s": time.perf_counter() - start, "tokens": reply.usage.completion_tokens})

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    seconds = time.perf_counter() - start
    await client.close()
    return [{**r, "wall_s": seconds} for r in records]


def summary(records: list[dict]) -> dict:
    latency = np.array([r["latency_s"] for r in records])
    wall = records[0]["wall_s"]
    sources = sorted({r["source"] for r in records})
    think = lambda rs: float(np.mean([r["expert"] == "think" for r in rs]))  # noqa: E731
    return {"requests": len(records), "seconds": round(wall, 2), "requests_per_s": round(len(records) / wall, 3),
            "p50_s": round(float(np.percentile(latency, 50)), 3), "p95_s": round(float(np.percentile(latency, 95)), 3),
            "thinking_ratio": round(think(records), 3),
            "thinking_ratio_by_source": {s: round(think([r for r in records if r["source"] == s]), 3) for s in sources},
            "mean_tokens": round(float(np.mean([r["tokens"] for r in records])), 2),
            "generated_tokens_per_s": round(sum(r["tokens"] for r in records) / wall, 1)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/router/final", help="HOME checkpoint with a trained router")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--prompts", type=int, default=320,
                        help="prompts of the evaluation mix (320: all of them), each sent once a mode")
    parser.add_argument("--max-tokens", type=int, default=160, help="max_tokens of every request (the router stage's)")
    args, overrides = parser.parse_known_args()
    from home_rl.model.lora_expert import has_lora_think

    whole_machine = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    lora = has_lora_think(args.checkpoint)
    dense = ["engine.lora_engine=merged"] if lora else []  # an engine per view (a LoRA think expert merged)
    servers = {"hybrid": [*dense, *overrides],  # each engine on its half of the cores (engine.cpu_threads_bind=split)
               "think_only": [f"engine.cpu_threads_bind={whole_machine}", *dense, *overrides]}  # think on all, fast idle
    if lora:
        servers["hybrid_one_engine"] = ["engine.lora_engine=adapter", *overrides]
    results = {}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        rows = eval_prompts(args.prompts, Path(tmp) / "data")
        for mode, expert in ((m, e) for m, e in MODES.items() if m in servers):
            proc, url = start_server(args.checkpoint, Path(tmp) / mode, servers[mode])
            try:
                for warm in ("fast", "think"):  # each engine's first request is slow
                    asyncio.run(load(url, rows[:1], warm, 1, 8))
                results[mode] = summary(asyncio.run(load(url, rows, expert, args.clients, args.max_tokens)))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    return {"benchmark": "serve_load", "checkpoint": args.checkpoint, "clients": args.clients, "prompts": len(rows),
            "max_tokens": args.max_tokens, "think_expert": "lora" if lora else "full", "server_overrides": servers,
            "cpu_cores": len(os.sched_getaffinity(0)), **results,
            **{f"hybrid_vs_{other}": ratios(results["hybrid"], results[other])
               for other in ("think_only",) if other in results},
            **({"hybrid_one_engine_vs_hybrid": ratios(results["hybrid_one_engine"], results["hybrid"])} if lora else {})}


def ratios(a: dict, b: dict) -> dict:
    return {"requests_per_s": round(a["requests_per_s"] / b["requests_per_s"], 3), "p50": round(a["p50_s"] / b["p50_s"], 3),
            "mean_tokens": round(a["mean_tokens"] / b["mean_tokens"], 3)}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
