"""The router stage: label prompts by rolling out both experts, fit the router, save the HOME checkpoint.

    python recipes/train_router.py                                    # outputs/grpo_think/final, synthetic math + extract mix
    python recipes/train_router.py checkpoint=HOME_DIR output_dir=OUT data.path=FILE
    python recipes/train_router.py labels_path=OUT/labels.jsonl       # refit on existing labels (no rollouts)

Writes OUT/labels.jsonl (every number behind each label), OUT/metrics.jsonl (the fit, per epoch),
OUT/router_metrics.json and OUT/final/ (the HOME checkpoint with the trained router; nothing else changed).
"""
from __future__ import annotations

from home_rl.cli import run_recipe
from home_rl.router.config import RouterStageConfig


def main(cfg: RouterStageConfig) -> None:
    from home_rl.trainer.router_stage import train_router

    final = train_router(cfg)
    print(f"labels: {cfg.output_dir}/labels.jsonl")
    print(f"HOME checkpoint with the trained router: {final}")


if __name__ == "__main__":
    run_recipe(main, RouterStageConfig)
