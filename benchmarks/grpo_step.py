"""Time per phase of a GRPO step of the default run, and the orchestration overhead share.

    python benchmarks/grpo_step.py                       # the embedded default, 4 steps (first one is warm-up)
    python benchmarks/grpo_step.py model.path=HOME_DIR trainer.total_steps=6
    python benchmarks/grpo_step.py trainer.total_steps=3 --compare learner.zero_stage=auto learner.zero_stage=3
    python benchmarks/grpo_step.py trainer.total_steps=3 --compare model.think_expert=full model.think_expert=lora

Prints one JSON object (with --compare: one per setting, run one after the other with the same seed, and
each setting's update time over the first's). `overhead_share` is the part of a step spent outside rollout, reward
scoring and learner compute (old log-probs, reference, update): driver work, Ray transfers and
the weight push to the rollout engines. The first step is left out of the means (engine warm-up).
"""
from __future__ import annotations

import json
import os
import resource
import tempfile

import numpy as np
import torch

if not torch.cuda.is_available():  # before transformers imports deepspeed, whose accelerator probe prints to stdout
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from home_rl.config import load_config
from home_rl.trainer.grpo_think import GRPOThinkConfig, GRPOThinkTrainer

COMPUTE = ("timing/rollout_s", "timing/reward_s", "timing/old_log_prob_s", "timing/reference_s", "timing/update_s")


def measured_steps(argv: list[str]) -> tuple[GRPOThinkConfig, list[dict], dict]:
    """The run's config, the metrics of every step and the learners' figures (peak RSS per learner, trainable
    parameters): no checkpoints, no resume."""
    cfg = load_config(GRPOThinkConfig, ["trainer.total_steps=4", "trainer.save_every=0", "trainer.resume=never",
                                        f"output_dir={tempfile.mkdtemp(prefix='grpo_bench_')}", *argv])
    trainer = GRPOThinkTrainer(cfg)
    steps = []
    try:
        while trainer.step < cfg.trainer.total_steps:
            steps.append(trainer.train_step())
        learners = {"learner_peak_rss_gb": [round(g, 3) for g in trainer.learner.peak_rss_gb()],
                    "trainable_params": trainer.learner.info[0]["trainable"]}
    finally:
        trainer.shutdown()
    return cfg, steps, learners


FIRST_STEP = ("reward/mean", "reward/std", "response_length/mean", "zero_std_frac")


def main(argv: list[str]) -> dict:
    cfg, steps, learners = measured_steps(argv)
    measured = steps[1:] or steps  # the first step warms the engines up
    mean = {key: float(np.mean([m[key] for m in measured])) for key in (*COMPUTE, "timing/weight_sync_s", "timing/step_s")}
    compute = sum(mean[k] for k in COMPUTE)
    return {
        "benchmark": "grpo_step", "model": cfg.model.path, "steps_measured": len(measured),
        "prompts_per_step": cfg.data.prompts_per_step, "n": cfg.rollout.n,
        "max_response_tokens": cfg.rollout.max_response_tokens, "learners": cfg.learner.num_learners,
        "rollout_workers": cfg.rollout.num_workers, "reward_workers": cfg.reward.num_workers,
        **{k.replace("timing/", ""): round(v, 3) for k, v in mean.items()},
        "response_length_mean": float(np.mean([m["response_length/mean"] for m in measured])),
        "tokens_computed": float(np.mean([m["learner/tokens_computed"] for m in measured])),
        "positions_computed": float(np.mean([m["learner/positions_computed"] for m in measured])),
        "overhead_s": round(mean["timing/step_s"] - compute, 3),
        "overhead_share": round((mean["timing/step_s"] - compute) / mean["timing/step_s"], 4),
        "weight_sync_mb": float(np.mean([m.get("weight_sync/mb", 0.0) for m in measured])),
        "weight_push_s": round(float(np.mean([m.get("timing/weight_push_s", 0.0) for m in measured])), 3),
        # the driver process's peak so far (with --compare: over this run and the ones before it)
        "driver_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        **learners,
        # what a placement must not change: the first step's samples and rewards (the same seed)
        "first_step": {k: steps[0][k] for k in FIRST_STEP if k in steps[0]},
    }


def compare(settings: list[str], argv: list[str]) -> dict:
    runs = {setting: main([*argv, setting]) for setting in settings}
    first = runs[settings[0]]
    return {"benchmark": "grpo_step", "compare": settings, "runs": runs,
            "update_s_over_first": {s: round(r["update_s"] / first["update_s"], 3) for s, r in runs.items()},
            "step_s_over_first": {s: round(r["step_s"] / first["step_s"], 3) for s, r in runs.items()},
            "tokens_computed_over_first": {s: round(r["tokens_computed"] / first["tokens_computed"], 3)
                                           for s, r in runs.items()},
            "first_step_same": all(r["first_step"] == first["first_step"] for r in runs.values())}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", nargs="+", default=[], metavar="KEY=VALUE",
                    help="settings to run one after the other, each on top of the overrides")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args()
    print(json.dumps(compare(args.compare, args.overrides) if args.compare else main(args.overrides)))
