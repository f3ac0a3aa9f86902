"""A LoRA think expert in the rollout engine: the fast view with the adapter against the merged think view.

    python benchmarks/lora_engine.py                      # the embedded default's LoRA cold start, GRPO's rollout
    python benchmarks/lora_engine.py --prompts 32 --adapter-std 0.02

One vLLM rollout worker (GRPO's default rollout settings and placement) answers the same prompts (the default
run's synthetic math, think template, rollout.n samples each, one seed) twice: over the merged think view (a dense
model), and over the fast view with the think adapter on every request (vLLM's LoRA path, what GRPO runs with
model.think_expert=lora). The adapter's B matrices are drawn (std --adapter-std) so the adapter computes something.
Prints one JSON object: seconds, generated tokens and tokens/s per engine, and whether the samples agree.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts (rollout.n samples each)")
    ap.add_argument("--adapter-std", type=float, default=0.01, help="std of the adapter's B matrices")
    args = ap.parse_args()

    import ray

    from data_pipelines import DataConfig, render_prompt
    from data_pipelines.synthetic import make_rows
    from home_rl.config import LoraConfig
    from home_rl.experts import FAST, THINK
    from home_rl.model import HomeModel
    from home_rl.model.lora_expert import ADAPTER_DIR
    from home_rl.rollout import RolloutPool
    from home_rl.trainer.cold_start import ensure_cold_start
    from home_rl.trainer.grpo_config import GRPOThinkConfig
    from home_rl.trainer.startup import ensure_ray, load_processor

    cfg = GRPOThinkConfig().resolve()
    home_dir = ensure_cold_start("smollm2", lora=LoraConfig().spec())
    tmp = Path(tempfile.mkdtemp(prefix="lora_engine_"))
    home = HomeModel.from_pretrained(home_dir)
    generator = torch.Generator().manual_seed(0)
    for name, p in home.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * args.adapter_std)
    home = HomeModel.from_pretrained(home.save_pretrained(tmp / "home"))
    views = {"merged_think_view": (home.export_view(THINK, tmp / "think"), None),
             "fast_view_with_adapter": (home.export_view(FAST, tmp / "fast"), str(tmp / "home" / ADAPTER_DIR))}
    processor = load_processor(tmp / "home")
    rows, _ = make_rows("math", args.prompts, seed=0, levels=(1, 2, 3, 4))
    prompts = [{"prompt_token_ids": render_prompt(r, THINK, processor, DataConfig()).prompt_token_ids} for r in rows]

    ensure_ray(2)
    out: dict = {"benchmark": "lora_engine", "prompts": len(prompts), "n": cfg.rollout.n,
                 "temperature": cfg.rollout.temperature, "max_response_tokens": cfg.rollout.max_response_tokens,
                 "dtype": cfg.rollout.dtype, "adapter_std": args.adapter_std}
    samples = {}
    for mode, (view, adapter) in views.items():
        pool = RolloutPool(str(view), cfg.rollout, adapter=adapter)
        try:
            pool.generate(prompts[:2], n=1, seed=1)  # warm-up
            start = time.perf_counter()
            result = pool.generate(prompts, seed=0)
            seconds = time.perf_counter() - start
        finally:
            pool.shutdown()
        tokens = sum(len(s.response_ids) for group in result.samples for s in group)
        samples[mode] = [[s.response_ids for s in group] for group in result.samples]
        out[mode] = {"seconds": round(seconds, 2), "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    ray.shutdown()
    a, b = samples.values()
    out["same_samples"] = sum(x == y for ga, gb in zip(a, b) for x, y in zip(ga, gb)) / sum(len(g) for g in a)
    out["adapter_over_merged_seconds"] = round(out["fast_view_with_adapter"]["seconds"]
                                               / out["merged_think_view"]["seconds"], 2)
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
