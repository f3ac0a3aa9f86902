"""The `trainer` section every training driver shares: steps, checkpoints, resume, logging."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from home_rl.errors import ConfigError


@dataclasses.dataclass
class TrainerConfig:
    total_steps: int = 100  # optimizer steps, each on data.prompts_per_step rows
    save_every: int = 50  # steps between checkpoints (0: none before the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir/checkpoints
    resume: str = "auto"  # auto (newest checkpoint in output_dir, if any) | never | a checkpoint folder
    log_every: int = 10  # steps between console log lines (metrics.jsonl gets every step)
    tensorboard: bool = True  # also write TensorBoard event files under output_dir/tensorboard
    console: str = "quiet"  # quiet (phases, steps, warnings, errors; library output to output_dir/logs/) | full (all of it on the console)

    CHOICES: ClassVar[dict] = {"console": ("quiet", "full")}


@dataclasses.dataclass
class GRPOTrainerConfig(TrainerConfig):
    max_staleness: int = 0  # asynchronous GRPO: step j's rollouts come from weights version j - k while the learners update (0: synchronous, rollout then update)

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ConfigError(f"trainer.max_staleness must be 0 (synchronous) or a number of versions, got {self.max_staleness}")
