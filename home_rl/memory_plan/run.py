"""What the plan needs to know of a job, whichever recipe it is: each recipe's config returns one from its
`memory_run()` (GRPOThinkConfig, SFTConfig, RouterStageConfig, EvaluateConfig)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from home_rl.learner.config import LearnerConfig
    from home_rl.rollout.config import RolloutConfig


@dataclasses.dataclass
class Run:
    """The actors a job starts and the sizes that decide their memory."""
    model_path: str = ""  # the config.json's folder (model.path, or the checkpoint), or an embedded model's name
    embedded_home: bool = False  # an embedded model's name means its HOME cold start (GRPO), else its dense model
    learner: Optional[LearnerConfig] = None  # None: no learners
    rollout: Optional[RolloutConfig] = None  # None: no rollout workers
    reward_workers: int = 0
    router_trainer: bool = False  # the router stage / evaluation's actor holding the HOME checkpoint
    dtype: str = "bfloat16"  # model.dtype: the learners' training dtype
    prompt_tokens: int = 1024  # data.max_prompt_tokens
    response_tokens: int = 128  # the longest response a learner trains on
    exports_view: bool = False  # a process of its own exports the think view before the engines start (GRPO)
    staged_versions: int = 0  # weight versions learner rank 0 keeps for the engines (GRPO: the engines' and the next ones)
    mode: str = "disaggregated"  # cluster.mode
    on_long_prompt: str = "error"
