"""learner.zero_stage=auto, resolved: the one function that turns the setting into the stage the learners run.

The recipes resolve it at start-up from the memory plan (home_rl/trainer/startup.py::check_memory, before
config.yaml is written, so that it records the stage); a LearnerGroup built in code without a plan (tests,
benchmarks) gets this function's rule for that case.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from home_rl.memory_plan.report import MemoryPlan

log = logging.getLogger(__name__)

ZERO_STAGES = (0, 1, 2, 3)
# The stage auto becomes where no plan picks one: ZeRO-3 partitions weights, gradients and optimiser state over the
# learners, the most likely stage to fit when nothing was planned (a wrong low stage fails only when training starts).
UNPLANNED_STAGE = 3


def resolve_zero_stage(setting: Any, plan_at: Optional[Callable[[int], MemoryPlan]] = None) -> int:
    """The ZeRO stage that `learner.zero_stage` (0-3 or auto) means.

    A number is itself. auto is the lowest stage whose plan fits (`plan_at(stage)`: the memory plan at that stage;
    less partitioning is less communication), and ZeRO-3 where none fits, where the learners could not be planned
    (GPUs of unknown memory), or where there is no plan at all (`plan_at` None: a learner group built in code)."""
    if setting != "auto":
        return int(setting)
    if plan_at is None:
        log.info("learner.zero_stage=auto with no memory plan (a learner group built in code): ZeRO stage %d",
                 UNPLANNED_STAGE)
        return UNPLANNED_STAGE
    for stage in ZERO_STAGES:
        result = plan_at(stage)
        if not any(a.role == "learner" for a in result.actors):
            return UNPLANNED_STAGE
        if result.fits:
            return stage
    return UNPLANNED_STAGE
