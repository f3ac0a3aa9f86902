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
    log_every: int = 1  # steps between console lines (the step's metrics, seconds a step, time left); metrics.jsonl and TensorBoard get every step
    tensorboard: bool = True  # also write TensorBoard event files under output_dir/tensorboard
    console: str = "quiet"  # quiet (phases, steps, warnings, errors; library output to output_dir/logs/) | full (all of it on the console)

    CHOICES: ClassVar[dict] = {"console": ("quiet", "full")}


@dataclasses.dataclass
class GRPOTrainerConfig(TrainerConfig):
    max_staleness: int = 0  # asynchronous GRPO: step j's rollouts come from weights version j - k while the learners update (0: synchronous, rollout then update)
    learnability_check: bool = True  # before the first step: pass@1, share of prompt groups scoring alike and entropy of the starting policy on training prompts (learnability/* at step 0)
    learnability_prompts: int = 16  # training prompts the check samples (rollout.n each)
    learnability_warn_alike: float = 0.6  # warn when more than this share of the check's groups score all alike

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ConfigError(f"trainer.max_staleness must be 0 (synchronous) or a number of versions, got {self.max_staleness}")
