"""Hybrid evaluation: the router picks an expert per query and that expert's view answers (vLLM).

    python recipes/evaluate.py                                        # outputs/router/final on a held-out synthetic mix
    python recipes/evaluate.py checkpoint=HOME_DIR output_dir=OUT data.path=FILE

Writes OUT/report.json ({"hybrid" | "always_think" | "always_fast" | "oracle" | "type_labels":
{group: {"accuracy", "think_ratio", "mean_tokens", "prompts"}}, "info": ...}), OUT/report.md,
OUT/report.png and OUT/samples.jsonl. Groups: all, each data_source, and per step count
("math@steps=3", "math@steps>=3") for sources whose rows have several.
"""
from __future__ import annotations

from home_rl.cli import run_recipe
from home_rl.router.config import EvaluateConfig


def main(cfg: EvaluateConfig) -> None:
    from home_rl.trainer.evaluate import evaluate

    report = evaluate(cfg)
    print(f"report: {cfg.output_dir}/report.md (hybrid accuracy {report['hybrid']['all']['accuracy']:.3f}, "
          f"thinking ratio {report['hybrid']['all']['think_ratio']:.2f})")


if __name__ == "__main__":
    run_recipe(main, EvaluateConfig)
