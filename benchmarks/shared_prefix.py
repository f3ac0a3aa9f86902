"""Shared-prefix rows against a row per sequence: update time and learner tokens computed, side by side.

    python benchmarks/shared_prefix.py                     # both workloads
    python benchmarks/shared_prefix.py --workload vl       # one of them: default | vl

default: the embedded default (SmolLM2 HOME, 16 prompts x 4 samples, 2 learners).
vl: a tiny random Qwen2.5-VL HOME on easy-vqa questions whose images are resized to 448 x 448 pixels
(256 image tokens a prompt), 8 prompts x 8 samples (rollout.n=8), 32-token responses.
Each workload runs benchmarks/grpo_step.py's comparison: learner.shared_prefix=false, then =true, in one
process with the same seed. Prints one JSON object: per workload both runs, and sharing's update-time
and tokens-computed ratios.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from grpo_step import compare

SETTINGS = ["learner.shared_prefix=false", "learner.shared_prefix=true"]
IMAGE_PIXELS = 448 * 448


def vl_overrides(folder: Path) -> list[str]:
    """A tiny Qwen2.5-VL HOME checkpoint and easy-vqa rows under `folder`, and the run's settings for them."""
    from data_pipelines.synthetic import generate
    from home_rl.model import upcycle
    from home_rl.tiny import build_tiny_model

    home = upcycle(build_tiny_model("qwen2_5_vl", folder / "dense")).save_pretrained(folder / "home")
    data = generate("vqa", 64, 0, folder / "vqa")
    return [f"model.path={home}", "model.dtype=float32", f"data.path={data}", "data.prompts_per_step=8",
            f"data.min_pixels={IMAGE_PIXELS}", f"data.max_pixels={IMAGE_PIXELS}", "data.max_prompt_tokens=512",
            "data.stratify_by=data_source", "rollout.n=8", "rollout.max_response_tokens=32", "rollout.max_model_len=768",
            "rollout.kv_cache_gib=0.5", "rollout.dtype=float32", "algorithm.filter_zero_variance=false",
            "eval.rows=0", "learner.micro_batch_size=16"]


def ratios(result: dict) -> dict:
    unshared, shared = (result["runs"][s] for s in SETTINGS)
    return {"update_s_unshared": unshared["update_s"], "update_s_shared": shared["update_s"],
            "update_speedup": round(unshared["update_s"] / shared["update_s"], 3),
            "tokens_computed_unshared": unshared["tokens_computed"], "tokens_computed_shared": shared["tokens_computed"],
            "tokens_computed_ratio": round(unshared["tokens_computed"] / shared["tokens_computed"], 3),
            "positions_computed_ratio": round(unshared["positions_computed"] / shared["positions_computed"], 3),
            "step_s_unshared": unshared["step_s"], "step_s_shared": shared["step_s"]}


def main(workloads: list[str], steps: int) -> dict:
    out: dict = {"benchmark": "shared_prefix", "settings": SETTINGS}
    for workload in workloads:
        with tempfile.TemporaryDirectory(prefix=f"shared_prefix_{workload}_") as tmp:
            overrides = vl_overrides(Path(tmp)) if workload == "vl" else []
            result = compare(SETTINGS, [*overrides, f"trainer.total_steps={steps}"])
        out[workload] = {**ratios(result), "runs": result["runs"]}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["default", "vl"], action="append",
                    help="default | vl (repeatable; default: both)")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first is warm-up, left out)")
    args = ap.parse_args()
    print(json.dumps(main(args.workload or ["default", "vl"], args.steps)))
