"""The main job: GRPO on the think expert of a HOME model (fast expert and shared weights frozen).

    python recipes/grpo_think.py                               # the embedded default, on a local Ray runtime
    python recipes/grpo_think.py --config recipes/configs/qwen2_5_vl_7b_8gpu.yaml
    ray job submit --working-dir . -- python recipes/grpo_think.py trainer.total_steps=2

Writes config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/ (a HOME checkpoint) and plots/
under output_dir. `trainer.resume=auto` continues from the newest complete checkpoint.
"""
from __future__ import annotations

from home_rl.cli import run_recipe
from home_rl.trainer.grpo_think import GRPOThinkConfig, train


def main(cfg: GRPOThinkConfig) -> None:
    final = train(cfg)
    print(f"final HOME checkpoint: {final}")


if __name__ == "__main__":
    run_recipe(main, GRPOThinkConfig)
