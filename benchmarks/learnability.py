"""The main job's learnability check, alone: how much GRPO signal a starting checkpoint gives on its training prompts.

    python benchmarks/learnability.py                                  # the embedded default's cold start
    python benchmarks/learnability.py --prompts 64 model.path=HOME_DIR rollout.temperature=1.2

Starts the reward pool and the rollout workers of the main job (no learners), samples `--prompts` training
prompts `rollout.n` times each at the rollout's settings, and prints one JSON object: pass@1, pass@n, the
share of prompt groups whose samples score alike, entropy per token, and the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from home_rl.config import load_config
from home_rl.experts import THINK
from home_rl.trainer.grpo_config import GRPOThinkConfig


def measure(argv: list[str], prompts: int) -> dict:
    from data_pipelines import load_dataset
    from home_rl.trainer.grpo_think import make_synthetic_data
    from home_rl.trainer.rollout_side import RolloutSide
    from home_rl.trainer.startup import (ensure_ray, job_placement, load_processor, resolve_home_checkpoint,
                                         shut_down)

    cfg = load_config(GRPOThinkConfig, [f"output_dir={tempfile.mkdtemp(prefix='learnability_')}", "eval.rows=0",
                                        *argv])
    make_synthetic_data(cfg)
    home = resolve_home_checkpoint(cfg.model.path)
    processor = load_processor(home)
    rows = load_dataset(cfg.data, processor, experts=(THINK,)).rows
    ensure_ray(cfg.rollout.num_workers + cfg.reward.num_workers + 1)
    placement = job_placement(cfg.cluster, rollout=cfg.rollout, reward=cfg.reward)
    side = None
    try:
        side = RolloutSide(cfg, home, placement, processor, rows, [])
        start = time.perf_counter()
        check = side.measure_learnability(prompts)
        seconds = time.perf_counter() - start
    finally:
        shut_down(side, placement)
    return {"benchmark": "learnability", "model": str(home), "temperature": cfg.rollout.temperature,
            "max_response_tokens": cfg.rollout.max_response_tokens, "levels": cfg.synthetic_levels,
            **{k.removeprefix("learnability/"): round(v, 4) for k, v in check.metrics().items()},
            "seconds": round(seconds, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64, help="training prompts sampled (rollout.n samples each)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides of the main job")
    args = ap.parse_args()
    print(json.dumps(measure(args.overrides, args.prompts)))
