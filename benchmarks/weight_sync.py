"""The weight plane: a think expert's tensors sent from the process that holds them straight to 1 and 2 vLLM engines.

    python benchmarks/weight_sync.py                 # prints one JSON object
    python benchmarks/weight_sync.py --rounds 5 --models smollm2

Per model and engine count: each round's seconds, bytes and buckets, and the peak RSS (VmHWM) of the driver, the
sender and each engine. The sender is a Ray actor of its own holding the tensors, as learner rank 0 does in a run
(`WeightSender`, vLLM's weight-transfer API: `gloo` on CPU, `nccl` where the engines and the sender have GPUs);
the driver only asks it to send. Models: the embedded default (SmolLM2-135M, the decoder MLPs: what GRPO trains,
under the view's names, in float32 where the CPU lacks bf16) and a tiny Qwen2.5-VL (the language model's and the
vision tower's MLPs). Each round sends new values, so the engines load what they get.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_gb(pid: int | None = None) -> float:
    """VmHWM of a process (this one when None), in GB."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


class SenderActor:
    """Holds a view's MLP tensors and a WeightSender, as learner rank 0 does."""

    def __init__(self, view: str, dtype: str):
        from safetensors.torch import load_file

        from home_rl.weights import WeightSender

        state = {}
        for f in sorted(Path(view).glob("*.safetensors")):
            state.update(load_file(f))
        self.mlp = {k: v.to(getattr(torch, dtype)) for k, v in state.items() if ".mlp." in k}
        self.sender = WeightSender()

    def stage(self, version: int) -> None:
        gen = torch.Generator().manual_seed(version)
        self.sender.stage(version, [(k, v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
                                    for k, v in self.mlp.items()])

    def connect_engines(self, engines: list, workers_per_engine: int, backend: str) -> None:
        self.sender.connect(engines, workers_per_engine, backend)

    def send_weights(self, version: int) -> dict:
        return self.sender.send(version)

    def peak_rss_gb(self) -> float:
        return peak_rss_gb(os.getpid())


def measure(view: str, engines: int, rounds: int, dtype: str) -> dict:
    import ray

    from home_rl.resources import Resources
    from home_rl.rollout import RolloutConfig, RolloutPool
    from home_rl.weights import ActorSender

    cores = os.cpu_count() or 1
    cfg = RolloutConfig(num_workers=engines, n=1, dtype=dtype, max_model_len=512, max_response_tokens=16,
                        kv_cache_gib=0.5, resources=Resources(cpus=1, threads=max(1, cores // engines)))
    actor = ray.remote(SenderActor).options(num_cpus=0).remote(view, dtype)
    pool = RolloutPool(view, cfg)
    try:
        pool.attach(ActorSender(actor))
        reports = []
        for version in range(1, rounds + 1):
            ray.get(actor.stage.remote(version))
            report = pool.sync(version)
            reports.append({k: report[k] for k in ("seconds", "bytes", "buckets", "tensors")})
        steady = reports[1:] or reports  # the first round also warms the engines' loaders
        return {"engines": engines, "backend": cfg.transfer_backend, "rounds": reports,
                "seconds_mean": sum(r["seconds"] for r in steady) / len(steady),
                "mb": reports[0]["bytes"] / 2**20, "buckets": reports[0]["buckets"],
                "sender_peak_rss_gb": ray.get(actor.peak_rss_gb.remote()),
                "engine_peak_rss_gb": [peak_rss_gb(info["pid"]) for info in pool.info],
                "driver_peak_rss_gb": peak_rss_gb()}
    finally:
        pool.shutdown()
        ray.kill(actor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen2_5_vl"], choices=["smollm2", "qwen2_5_vl"])
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from home_rl.model.embedded import resolve_model_path
    from home_rl.resources import bf16_supported
    from home_rl.tiny import build_tiny_model

    dtype = "bfloat16" if bf16_supported(torch.device("cpu")) else "float32"
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    out: dict = {"benchmark": "weight_sync", "dtype": dtype, "cores": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        views = {"smollm2": str(resolve_model_path("smollm2")),
                 "qwen2_5_vl": str(build_tiny_model("qwen2_5_vl", Path(tmp) / "vl"))}
        for name in args.models:
            out["models"][name] = [measure(views[name], engines, args.rounds, dtype) for engines in (1, 2)]
            print(f"{name}: done", file=sys.stderr)
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
