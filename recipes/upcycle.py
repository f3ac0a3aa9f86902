"""Upcycle a dense checkpoint into a HOME checkpoint: every decoder MLP becomes {fast, think} copies.

    python recipes/upcycle.py                                  # the embedded SmolLM2-135M-Instruct
    python recipes/upcycle.py model.path=DENSE_DIR output_dir=OUT router.layer=12
    python recipes/upcycle.py model.think_expert=lora model.lora.rank=16   # think: a LoRA adapter over fast's MLPs
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from home_rl.cli import run_recipe
from home_rl.config import ModelConfig, RouterConfig, save_config


@dataclasses.dataclass
class DenseModelConfig(ModelConfig):
    """ModelConfig with `auto` as the default dtype: upcycling copies weights, so it keeps their precision
    unless asked (the training recipes keep ModelConfig's bfloat16)."""
    path: str = "smollm2"  # dense checkpoint folder, or an embedded model's name (smollm2)
    dtype: str = "auto"  # auto (the dense checkpoint's own) | float32 | bfloat16 | float16: dtype of the HOME checkpoint

    CHOICES: ClassVar[dict] = {"dtype": ("auto", *ModelConfig.CHOICES["dtype"])}


@dataclasses.dataclass
class UpcycleConfig:
    model: DenseModelConfig = dataclasses.field(default_factory=DenseModelConfig)  # the dense model to upcycle
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)  # the new router's shape
    output_dir: str = "outputs/upcycle"  # where the HOME checkpoint is written
    seed: int = 0  # seeds the new router's weights (and the think adapter's A matrices)


def format_report(counts: dict[str, int]) -> str:
    total = counts["total"]
    rows = [f"{'parameters':<18}{'count':>14}{'share':>9}"]
    for key, n in counts.items():
        rows.append(f"{key:<18}{n:>14,}{n / total:>9.1%}")
    return "\n".join(rows)


def main(cfg: UpcycleConfig) -> None:
    from home_rl.model import DTYPES, upcycle
    from home_rl.model.architectures import read_config_json
    from home_rl.model.embedded import resolve_model_path

    dense_dir = resolve_model_path(cfg.model.path)
    import torch

    dtype = "auto" if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
    torch.manual_seed(cfg.seed)
    home = upcycle(dense_dir, dtype, cfg.router.layer, cfg.router.pooling, cfg.router.hidden_size,
                   cfg.model.lora_spec())
    out = home.save_pretrained(cfg.output_dir)
    save_config(cfg, out)
    used = str(home.base.dtype).removeprefix("torch.")
    raw = read_config_json(dense_dir)
    dense = raw.get("dtype") or raw.get("torch_dtype") or "not in its config.json"
    why = "the dense checkpoint's own" if cfg.model.dtype == "auto" else f"the dense checkpoint's is {dense}"
    print(f"HOME checkpoint of {dense_dir} ({home.arch.name}) written to {out}")
    print(f"dtype: {used} (model.dtype={cfg.model.dtype}: {why})")
    print(format_report(home.parameter_report()))


if __name__ == "__main__":
    run_recipe(main, UpcycleConfig)
