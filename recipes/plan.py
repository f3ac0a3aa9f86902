"""Will this config fit? Every actor's peak memory predicted from config.json and the run's config, nothing started.

    python recipes/plan.py --config recipes/configs/qwen2_5_vl_7b_8gpu.yaml model.path=/ckpt/home-7b \\
        --nodes 1 --gpus-per-node 8 --gpu-gib 80 --host-gib 1000
    python recipes/plan.py                                    # the embedded default on this machine
    python recipes/plan.py --recipe sft --config recipes/configs/sft_cold_start.yaml --json

The cluster is the described one (--nodes/--gpus-per-node/--gpu-gib/--host-gib), else the Ray cluster of
RAY_ADDRESS (its nodes' GPUs and RAM; --gpu-gib for its GPUs' memory), else this machine. `model.path` may be
a folder holding only a config.json. Prints a table (or with --json one object: fits, actors, advice); exits 0
when everything fits, 2 with one line naming the actor, predicted vs available, and the knobs that would help.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: this checkout's home_rl

RECIPES = ("grpo_think", "sft", "train_router", "evaluate")


def schema_of(recipe: str) -> type:
    """The recipe's config class: its memory_run() says what the recipe runs."""
    if recipe == "grpo_think":
        from home_rl.trainer.grpo_config import GRPOThinkConfig

        return GRPOThinkConfig
    if recipe == "sft":
        from home_rl.trainer.sft import SFTConfig

        return SFTConfig
    from home_rl.router.config import EvaluateConfig, RouterStageConfig

    return RouterStageConfig if recipe == "train_router" else EvaluateConfig


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipes/plan.py", description=__doc__.splitlines()[0],
                                 epilog="Other arguments: --config FILE and key=value overrides, as the recipe takes them.")
    ap.add_argument("--recipe", choices=RECIPES, default="grpo_think", help="whose config this is (default grpo_think)")
    ap.add_argument("--nodes", type=int, default=0, help="describe a cluster of this many nodes instead")
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--gpu-gib", type=float, default=0.0, help="memory of each GPU")
    ap.add_argument("--host-gib", type=float, default=0.0, help="RAM of each node")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args, rest = ap.parse_known_args(argv)

    from home_rl.config import load_config
    from home_rl.errors import HomeRLError
    from home_rl import memory_plan

    try:
        cfg = load_config(schema_of(args.recipe), rest, prog="recipes/plan.py")
        if args.nodes:
            cluster = memory_plan.described_cluster(args.nodes, args.gpus_per_node, args.gpu_gib, args.host_gib)
        elif os.environ.get("RAY_ADDRESS"):
            import ray

            ray.init(log_to_driver=False)  # a client of the cluster: it reads the nodes, starts no actor
            cluster = memory_plan.ray_cluster(args.gpu_gib)
        else:
            cluster = memory_plan.local_cluster()
        result = memory_plan.plan_for_config(cfg, cluster=cluster)
    except HomeRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"memory plan of {args.recipe} on {cluster.source}"
              + (f", ZeRO stage {result.zero_stage}" if result.zero_stage is not None else ""))
        print(result.table())
        host = sum(a.predicted_gib for a in result.actors if a.device == "host")
        print(f"host RAM needed: {host:.1f} GiB in all ({', '.join(f'{a.role}: {a.predicted_gib:.1f} GiB' for a in result.actors if a.device == 'host')})")
    refusal = result.refusal()
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
