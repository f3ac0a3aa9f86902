"""Reward pool throughput: math scoring of N distinct responses with 1 and with 2 reward workers, and two
other paths with 2 workers: a TRL-style batched function and a remote reward server.

    python benchmarks/reward_throughput.py [--samples 10000]

Prints one JSON object: samples/s for each worker count and `speedup_2_vs_1`, then `trl_batched` (a
`reward_func(completions, ground_truth, **kwargs)` running math-verify on each `<answer>`, one call per
worker's chunk) and `remote` (one JSON POST per chunk to an HTTP server in this process on 127.0.0.1,
which compares `<answer>` with the ground truth as text: the transport's cost, not a scorer's).
Responses are generated with a fixed seed in the think template, a mix of answer forms (integers,
fractions, decimals, `x = n`, `\\boxed{}`), about 70% of them right. Each pool is warmed up before it is
timed. The machine's load average is reported too: on a shared machine it bounds the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def trl_accuracy(completions, ground_truth, **kwargs):
    """A TRL-style batched reward: math-verify on each completion's <answer> (TRL's accuracy reward does the same)."""
    from math_verify import parse, verify

    scores = []
    for completion, truth in zip(completions, ground_truth):
        found = ANSWER.search(completion)
        scores.append(float(bool(found) and verify(parse(f"${truth}$"), parse(f"${found.group(1)}$"))))
    return scores


class ExactServer:
    """A reward server on 127.0.0.1 answering {"scores": [...]}: 1 when a sample's <answer> text is its ground truth."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scores = [float((m.group(1).strip() if (m := ANSWER.search(s["response"])) else None) == s["ground_truth"])
                          for s in body["samples"]]
                data = json.dumps({"scores": scores}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_samples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        num, den = rng.randint(1, 999), rng.choice([1, 2, 4, 5, 8, 10])
        truth = f"\\frac{{{num}}}{{{den}}}" if den > 1 else str(num)
        value = num / den if rng.random() < 0.7 else num / den + rng.choice([1, -1, 0.5])
        form = rng.randrange(4)
        if form == 0:
            answer = f"{value:g}"
        elif form == 1:
            answer = f"x = {value:g}"
        elif form == 2:
            answer = f"\\boxed{{{value:g}}}"
        else:
            answer = f"\\frac{{{round(value * den)}}}{{{den}}}"
        response = f"<think>Step {i}: {num} divided by {den}.</think><answer>{answer}</answer>"
        samples.append({"id": i, "response": response, "ground_truth": truth, "data_source": "math",
                        "extra_info": {"expert": "think"}})
    return samples


def measure(num_workers: int, samples: list[dict], timeout_s: float, math_entries: list | None = None) -> dict:
    """Score `samples` (data_source math) with the built-ins, or with `math_entries` as the math source's verifiers."""
    from reward import RewardConfig, RewardPool

    cfg = RewardConfig(num_workers=num_workers, timeout_s=timeout_s)
    if math_entries is not None:
        cfg.sources["math"] = math_entries
    pool = RewardPool(cfg)
    try:
        pool.score(make_samples(200, seed=1))  # warm-up: math-verify's first parses, Ray's first calls
        start = time.perf_counter()
        results, metrics = pool.score(samples)
        elapsed = time.perf_counter() - start
    finally:
        pool.shutdown()
    return {"samples_per_s": len(samples) / elapsed, "seconds": elapsed, "accuracy": metrics.get("reward/accuracy"),
            "failures": metrics["reward/failures"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    samples = make_samples(args.samples)
    load_before = os.getloadavg()[0]
    from reward import VerifierEntry

    one = measure(1, samples, args.timeout_s)
    two = measure(2, samples, args.timeout_s)
    trl = measure(2, samples, args.timeout_s, [VerifierEntry(f"{Path(__file__).resolve()}:trl_accuracy")])
    server = ExactServer()
    try:
        remote = measure(2, samples, args.timeout_s, [VerifierEntry(url=server.url)])
    finally:
        server.close()
    ray.shutdown()
    print(json.dumps({
        "benchmark": "reward_throughput", "task": "math (math-verify + format)", "samples": len(samples),
        "samples_per_s_1_worker": round(one["samples_per_s"], 1),
        "samples_per_s_2_workers": round(two["samples_per_s"], 1),
        "speedup_2_vs_1": round(two["samples_per_s"] / one["samples_per_s"], 3),
        "seconds_1_worker": round(one["seconds"], 2), "seconds_2_workers": round(two["seconds"], 2),
        "accuracy": round(one["accuracy"], 4), "accuracy_matches": one["accuracy"] == two["accuracy"],
        "failures": [one["failures"], two["failures"]],
        "samples_per_s_trl_batched_2_workers": round(trl["samples_per_s"], 1),
        "trl_batched_accuracy": round(trl["accuracy"], 4), "trl_batched_failures": trl["failures"],
        "samples_per_s_remote_2_workers": round(remote["samples_per_s"], 1),
        "remote_accuracy": round(remote["accuracy"], 4), "remote_failures": remote["failures"],
        "cpu_count": os.cpu_count(), "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }))


if __name__ == "__main__":
    main()
