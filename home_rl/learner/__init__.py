"""The DeepSpeed ZeRO-3 learner group: Ray actors that train a dense or HOME model together."""
from home_rl.learner.batch import Sequence
from home_rl.learner.config import LearnerConfig
from home_rl.learner.group import LearnerGroup
from home_rl.learner.losses import LossInputs

__all__ = ["LearnerConfig", "LearnerGroup", "LossInputs", "Sequence"]
