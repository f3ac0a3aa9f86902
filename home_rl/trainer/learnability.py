"""Whether GRPO can learn from the starting policy: measured on training prompts before the first step.

GRPO learns only from prompt groups whose samples score differently: a group whose n samples all
score alike has zero advantage everywhere. A policy that samples with almost no entropy (an SFT
cold start trained to a very low loss), or data far too easy or too hard for it, leaves most groups
alike, and the run spends its steps on nothing. This is measured before the first step, at the
rollout's own settings, and said in one line, with what to change when most groups are alike:

    learnability: pass@1 0.62, pass@4 0.81, 58% of 16 prompt groups score alike, entropy 0.21 nats/token

Entropy per token is the mean negative log-probability of the sampled tokens under the distribution
they were sampled from (the engine's processed log-probs): an unbiased estimate of that distribution's
entropy, from the samples alone.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from home_rl.trainer.groups import ScoredGroup


@dataclasses.dataclass
class Learnability:
    prompts: int  # prompt groups measured
    n: int  # samples per prompt
    pass_at_1: float  # mean accuracy (reward where no accuracy is configured) of every sample
    pass_at_n: float  # share of prompts with at least one correct sample
    alike_share: float  # share of prompts whose n samples all score alike (no GRPO signal)
    entropy: float  # mean entropy per sampled token, nats

    def metrics(self) -> dict[str, float]:
        return {"learnability/pass_at_1": self.pass_at_1, "learnability/pass_at_n": self.pass_at_n,
                "learnability/alike_share": self.alike_share, "learnability/entropy": self.entropy,
                "learnability/prompts": float(self.prompts), "learnability/n": float(self.n)}

    def line(self) -> str:
        return (f"pass@1 {self.pass_at_1:.2f}, pass@{self.n} {self.pass_at_n:.2f}, {self.alike_share:.0%} of "
                f"{self.prompts} prompt groups score alike, entropy {self.entropy:.3f} nats/token")

    def advice(self, warn_alike: float, temperature: float) -> Optional[str]:
        """What to change when more than `warn_alike` of the groups carry no signal (None: enough do)."""
        if self.alike_share <= warn_alike:
            return None
        if self.pass_at_1 >= 0.9:
            cause = "the data is too easy for this policy: use harder prompts (e.g. synthetic_levels)"
        elif self.pass_at_n <= 0.1:
            cause = "the data is too hard for this policy: use easier prompts, or a cold start that solves some"
        else:
            cause = (f"the policy samples with little entropy: raise rollout.temperature (now {temperature:g}) "
                     "or use a cold start trained less far")
        return (f"{self.alike_share:.0%} of prompt groups score all alike, so most of each step carries no signal: "
                f"{cause}; or raise rollout.n")


def measure(groups: Sequence[ScoredGroup]) -> Learnability:
    """The learnability of the policy that sampled `groups` (each a prompt's n scored samples)."""
    groups = [g for g in groups if g.samples]
    if not groups:
        raise ValueError("no sampled prompt groups to measure")
    correct = [[_correct(s) for s in g.scores] for g in groups]
    tokens = [(len(s.logprobs), -float(np.sum(s.logprobs))) for g in groups for s in g.samples]
    count = sum(n for n, _ in tokens)
    return Learnability(
        prompts=len(groups), n=max(len(g.samples) for g in groups),
        pass_at_1=float(np.mean([c for cs in correct for c in cs])),
        pass_at_n=float(np.mean([max(cs) for cs in correct])),
        alike_share=float(np.mean([g.zero_variance for g in groups])),
        entropy=sum(e for _, e in tokens) / count if count else 0.0)


def _correct(score: dict) -> float:
    value = score.get("accuracy")
    return float(score["score"] if value is None else value)
