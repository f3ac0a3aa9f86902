"""Time per phase of a GRPO step of the default run, and the orchestration overhead share.

    python benchmarks/grpo_step.py                       # the embedded default, 4 steps (first one is warm-up)
    python benchmarks/grpo_step.py model.path=HOME_DIR trainer.total_steps=6

Prints one JSON object. `overhead_share` is the part of a step spent outside rollout, reward
scoring and learner compute (old log-probs, reference, update): driver work, Ray transfers and
the weight push to the rollout engines. The first step is left out of the means (engine warm-up).
"""
from __future__ import annotations

import json
import sys
import tempfile

import numpy as np

from home_rl.config import load_config
from home_rl.trainer.grpo_think import GRPOThinkConfig, GRPOThinkTrainer

COMPUTE = ("timing/rollout_s", "timing/reward_s", "timing/old_log_prob_s", "timing/reference_s", "timing/update_s")


def main(argv: list[str]) -> dict:
    cfg = load_config(GRPOThinkConfig, ["trainer.total_steps=4", "trainer.save_every=0", "trainer.resume=never",
                                        f"output_dir={tempfile.mkdtemp(prefix='grpo_bench_')}", *argv])
    trainer = GRPOThinkTrainer(cfg)
    steps = []
    try:
        while trainer.step < cfg.trainer.total_steps:
            steps.append(trainer.train_step())
    finally:
        trainer.shutdown()
    measured = steps[1:] or steps
    mean = {key: float(np.mean([m[key] for m in measured])) for key in (*COMPUTE, "timing/weight_sync_s", "timing/step_s")}
    compute = sum(mean[k] for k in COMPUTE)
    return {
        "benchmark": "grpo_step", "model": cfg.model.path, "steps_measured": len(measured),
        "prompts_per_step": cfg.data.prompts_per_step, "n": cfg.rollout.n,
        "max_response_tokens": cfg.rollout.max_response_tokens, "learners": cfg.learner.num_learners,
        "rollout_workers": cfg.rollout.num_workers, "reward_workers": cfg.reward.num_workers,
        **{k.replace("timing/", ""): round(v, 3) for k, v in mean.items()},
        "response_length_mean": float(np.mean([m["response_length/mean"] for m in measured])),
        "overhead_s": round(mean["timing/step_s"] - compute, 3),
        "overhead_share": round((mean["timing/step_s"] - compute) / mean["timing/step_s"], 4),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
