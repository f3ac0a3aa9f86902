"""Asynchronous GRPO (trainer.max_staleness=1) against the synchronous loop: step time and idle time per group.

    python benchmarks/async_overlap.py                          # the embedded default's model, 4 steps each
    python benchmarks/async_overlap.py --steps 6 data.prompts_per_step=16

Both settings run one after the other in this process, with the same seed and the same work: one learner
and one rollout worker, each pinned to its own half of this machine's cores (`resources.cores`), as
disaggregated placement dedicates GPUs to each group; zero-variance filtering off, so every step trains
the same number of groups; no held-out evaluation or checkpoints. The first step of each run is warm-up
and left out of the means. Prints one JSON object: `sync_step_s`, `async_step_s`, `speedup`, and per
mode the mean rollout, update, learner-idle and rollout-idle seconds of a step.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from grpo_step import measured_steps  # sets DS_ACCELERATOR=cpu without CUDA, before deepspeed is imported

MODES = {"sync": "trainer.max_staleness=0", "async": "trainer.max_staleness=1"}
MEANS = ("step_s", "rollout_s", "reward_s", "update_s", "weight_sync_s", "wait_s", "learner_idle_s", "rollout_idle_s")


def dedicated_cores() -> list[str]:
    """Half of this process's cores for the rollout worker, the other half for the learner (as 'a-b' lists)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("async_overlap needs at least 2 cores: one for the rollout worker, one for the learner")
    half = len(cores) // 2
    return [",".join(map(str, cores[:half])), ",".join(map(str, cores[half:]))]


def run(setting: str, overrides: list[str], steps: int) -> dict:
    _, measured = measured_steps([f"trainer.total_steps={steps}", "eval.rows=0", *overrides, setting])
    out = {k: round(float(np.mean([m.get(f"timing/{k}", 0.0) for m in measured])), 3) for k in MEANS}
    out.update({"steps_measured": len(measured),
                "staleness_max": max(m["async/staleness_max"] for m in measured),
                "reward_mean": round(float(np.mean([m["reward/mean"] for m in measured])), 4)})
    if "async/is_weight_mean" in measured[-1]:
        out["is_weight_mean"] = round(float(np.mean([m["async/is_weight_mean"] for m in measured])), 4)
    return out


def main(overrides: list[str], steps: int) -> dict:
    rollout_cores, learner_cores = dedicated_cores()
    pinned = ["learner.num_learners=1", f"learner.resources.cores={learner_cores}",
              "rollout.num_workers=1", f"rollout.resources.cores={rollout_cores}",
              "algorithm.filter_zero_variance=false", "data.prompts_per_step=8"]
    results = {mode: run(setting, [*pinned, *overrides], steps) for mode, setting in MODES.items()}
    sync, fast = results["sync"]["step_s"], results["async"]["step_s"]
    return {"benchmark": "async_overlap", "settings": MODES, "overrides": [*pinned, *overrides],
            "rollout_cores": rollout_cores, "learner_cores": learner_cores,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "sync_step_s": sync, "async_step_s": fast, "speedup": round(sync / fast, 3),
            "idle_s": {mode: {"learner": r["learner_idle_s"], "rollout": r["rollout_idle_s"]} for mode, r in results.items()},
            "runs": results}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per mode (the first is warm-up, left out)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = ap.parse_args()
    print(json.dumps(main(args.overrides, args.steps)))
