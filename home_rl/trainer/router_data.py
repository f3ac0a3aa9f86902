"""The prompts the router stage and the evaluation answer: data.path, or a synthetic mix written once."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipelines import DataConfig, load_dataset
from home_rl.errors import ConfigError
from home_rl.router.config import SyntheticMixConfig


def synthetic_mix(cfg: SyntheticMixConfig, folder: Path) -> str:
    """Write the synthetic mix to `folder` (once; the same config gives the same rows) and return its path."""
    from data_pipelines.synthetic import generate

    if cfg.rows < 1:
        raise ConfigError(f"synthetic.rows must be at least 1, got {cfg.rows}")
    path = folder / "data.jsonl"
    if not path.is_file():
        generate("mix", cfg.rows, cfg.seed, folder, ratio=cfg.parsed_ratio(), image_fraction=cfg.image_fraction)
    return str(path)


def load_rows(data: DataConfig, synthetic: SyntheticMixConfig, folder: Path, processor: Any) -> list[dict]:
    """The validated rows of data.path, or of the synthetic mix written under `folder` when data.path is empty."""
    if not data.path:
        data.path = synthetic_mix(synthetic, folder)
    return load_dataset(data, processor).rows
