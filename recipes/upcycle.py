"""Upcycle a dense checkpoint into a HOME checkpoint: every decoder MLP becomes {fast, think} copies.

    python recipes/upcycle.py                                  # the embedded SmolLM2-135M-Instruct
    python recipes/upcycle.py model.path=DENSE_DIR output_dir=OUT router.layer=12
"""
from __future__ import annotations

import dataclasses

from home_rl.cli import run_recipe
from home_rl.config import ModelConfig, RouterConfig, save_config


@dataclasses.dataclass
class UpcycleConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the dense model to upcycle
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)  # the new router's shape
    output_dir: str = "outputs/upcycle"  # where the HOME checkpoint is written


def format_report(counts: dict[str, int]) -> str:
    total = counts["total"]
    rows = [f"{'parameters':<18}{'count':>14}{'share':>9}"]
    for key, n in counts.items():
        rows.append(f"{key:<18}{n:>14,}{n / total:>9.1%}")
    return "\n".join(rows)


def main(cfg: UpcycleConfig) -> None:
    from home_rl.model import DTYPES, upcycle
    from home_rl.model.embedded import resolve_model_path

    dense_dir = resolve_model_path(cfg.model.path)
    home = upcycle(dense_dir, DTYPES[cfg.model.dtype], cfg.router.layer, cfg.router.pooling, cfg.router.hidden_size)
    out = home.save_pretrained(cfg.output_dir)
    save_config(cfg, out)
    print(f"HOME checkpoint of {dense_dir} ({home.arch.name}) written to {out}")
    print(format_report(home.parameter_report()))


if __name__ == "__main__":
    run_recipe(main, UpcycleConfig)
