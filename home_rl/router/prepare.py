"""What the router stage and the evaluation both start with: the checkpoint, the rows, Ray, the router's inputs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from data_pipelines import DataConfig, load_dataset, render_prompt
from home_rl.errors import ConfigError, HomeRLError
from home_rl.router.config import SyntheticMixConfig
from home_rl.router.features import router_input


def resolve_checkpoint(path: str, key: str, make_it: str) -> Path:
    """The HOME checkpoint folder at `path`; a missing or dense folder is a one-line error saying what to run."""
    from home_rl.model import is_home_checkpoint

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise HomeRLError(f"{key}: no HOME checkpoint at {path}: run {make_it} first, or give {key}=HOME_DIR")
    if not is_home_checkpoint(folder):
        raise ConfigError(f"{key}={path} is a dense checkpoint: the router stage needs a HOME checkpoint "
                          f"(make one with recipes/upcycle.py model.path={path})")
    return folder


def load_processor(folder: Path) -> Any:
    from home_rl.learner.sft import load_processor as load

    return load(folder)


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


def router_inputs(rows: Sequence[dict], template: str, processor: Any, data: DataConfig) -> list[dict]:
    """Each row's prompt as the router reads it: rendered with `template`'s expert, images as pixel tensors."""
    return [router_input(render_prompt(row, template, processor, data)) for row in rows]


def ensure_ray(cpus_needed: float) -> None:
    """Join the cluster of RAY_ADDRESS, or start a local runtime with enough logical CPUs for every actor."""
    from home_rl.learner.sft import ensure_ray as ensure

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure(cpus_needed)
