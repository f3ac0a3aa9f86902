"""Rollout: vLLM engines that generate samples from an expert view, and receive weight updates.

    from home_rl.rollout import RolloutConfig, RolloutPool
    pool = RolloutPool(view_folder, RolloutConfig(num_workers=2))
    result = pool.generate(prompts)                      # result.samples[i]: the n Samples of prompts[i]
    pool.attach(sender); pool.sync(version=1)            # new weights from a home_rl.weights Sender

Heavy imports (vLLM, Ray) happen inside the workers and methods, not here.
"""
from home_rl.rollout.agreement import logprob_agreement, recompute_logprobs
from home_rl.rollout.config import RolloutConfig, check_rollout_config
from home_rl.rollout.inputs import RolloutInputError
from home_rl.rollout.pool import RolloutPool, split_batch
from home_rl.rollout.types import RolloutResult, Sample
from home_rl.rollout.worker import RolloutWorker

__all__ = ["RolloutConfig", "RolloutPool", "RolloutWorker", "RolloutResult", "Sample", "RolloutInputError",
           "check_rollout_config", "split_batch", "recompute_logprobs", "logprob_agreement"]
