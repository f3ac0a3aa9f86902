"""Supervised fine-tuning: the cold start of a dense model, or the paper's Stage-SFT of a HOME model.

    python recipes/sft.py model.path=DIR data.path=FILE output_dir=OUT trainer.total_steps=N
    python recipes/sft.py --config recipes/configs/sft_home.yaml model.path=HOME_DIR data.path=FILE

Writes OUT/config.yaml, OUT/metrics.jsonl (one object per step), OUT/tensorboard/,
OUT/checkpoints/step_N/ (resume=auto continues from the newest) and OUT/final/ (a checkpoint of
the input's kind: a dense folder that transformers loads, or a HOME checkpoint).
"""
from __future__ import annotations

from home_rl.cli import run_recipe
from home_rl.trainer.sft import SFTConfig, run_sft


def main(cfg: SFTConfig) -> None:
    final = run_sft(cfg)
    print(f"SFT finished: {final}")


if __name__ == "__main__":
    run_recipe(main, SFTConfig)
