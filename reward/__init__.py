"""Rewards for home-rl: the verifier registry, the built-in verifiers and the reward worker pool.

    from reward import get_verifier, register_verifier, RewardPool, RewardConfig

    @register_verifier("shout")
    def shout(response, ground_truth, *, data_source, extra_info):
        return float(response.isupper())
"""
from reward.config import RewardConfig, VerifierEntry, validate_sources
from reward.pool import RewardFailureError, RewardPool
from reward.registry import get_verifier, known_verifiers, register_verifier

__all__ = ["RewardConfig", "RewardFailureError", "RewardPool", "VerifierEntry", "get_verifier", "known_verifiers",
           "register_verifier", "validate_sources"]
