"""A GRPO step's data between rollout, reward and update: scored prompt groups, and what is measured on them.

    groups = [ScoredGroup(row, prompt, samples, scores), ...]   # one per prompt: its n samples and their rewards
    sequences = training_sequences(groups, advantages, ...)     # the learners' input
    metrics = reward_metrics(groups) | length_metrics(groups)   # what the policy did
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from home_rl.experts import THINK
from home_rl.learner.batch import Sequence as LearnerSequence


@dataclasses.dataclass
class ScoredGroup:
    row: dict  # the data row: id, data_source, answer, extra_info, ...
    prompt: Any  # data_pipelines.RenderedPrompt: the row rendered with the think template (token ids, images)
    samples: list  # home_rl.rollout.Sample per response (rollout.n of them; none for a skipped prompt)
    scores: list[dict]  # the reward pool's result per sample: score, plus accuracy / format where configured

    @property
    def rewards(self) -> list[float]:
        return [s["score"] for s in self.scores]

    @property
    def zero_variance(self) -> bool:
        """All samples scored alike: every advantage is 0, so the group teaches nothing."""
        return len({float(r) for r in self.rewards}) == 1


@dataclasses.dataclass
class StepRollouts:
    sampled: list[ScoredGroup]  # everything generated this step, kept or not: what the policy's reward is measured on
    trained: list[ScoredGroup]  # the groups the update trains on (zero-variance ones filtered out when asked)
    zero_std_frac: float  # share of the first round's groups that scored all alike
    regenerations: int  # rollout rounds run after the first to refill the batch
    reward_pool: dict[str, float]  # the reward pool's own metrics of the first round (failures, per-verifier means)
    worker_restarts: int = 0  # rollout workers lost and replaced while making this step's rollouts
    worker_restarts_total: int = 0  # ... since the run started


def training_sequences(groups: Sequence[ScoredGroup], advantages: Sequence[float],
                       rollout_log_probs: bool) -> list[LearnerSequence]:
    """One learner sequence per sample, in group order: prompt + response, its advantage on every response
    token, and the rollout engine's log-probs as the behaviour policy's (`rollout_log_probs` in token_data: the
    importance weight old / behaviour, and the engine-learner agreement metrics); with `rollout_log_probs`
    they also stand in for the old policy's."""
    seqs, adv = [], iter(advantages)
    for group in groups:
        for sample in group.samples:
            n = len(sample.response_ids)
            token_data = {"advantages": [float(next(adv))] * n, "rollout_log_probs": list(sample.logprobs)}
            if rollout_log_probs:
                token_data["old_log_probs"] = list(sample.logprobs)
            seqs.append(LearnerSequence(prompt_ids=group.prompt.prompt_token_ids, response_ids=list(sample.response_ids),
                                        route=THINK, token_data=token_data, mm_inputs=group.prompt.mm_inputs,
                                        mm_token_type_ids=group.prompt.mm_token_type_ids))
    return seqs


def reward_metrics(groups: Sequence[ScoredGroup]) -> dict[str, float]:
    """Reward, accuracy and format rate, overall and per data_source."""
    per_source: dict[str, list[dict]] = defaultdict(list)
    for group in groups:
        per_source[group.row["data_source"]] += group.scores
    out = {}
    everything = [s for scores in per_source.values() for s in scores]
    for name, scores in [("", everything)] + [(f"/{src}", s) for src, s in sorted(per_source.items())]:
        values = np.array([s["score"] for s in scores], dtype=float)
        out[f"reward{name}/mean"] = float(values.mean())
        if not name:
            out["reward/std"] = float(values.std())
        for key in ("accuracy", "format"):  # None where no verifier of that kind is configured
            values = [s[key] for s in scores if s.get(key) is not None]
            if values:
                out[f"{key}{name}"] = float(np.mean(values))
    return out


def length_metrics(groups: Sequence[ScoredGroup], prefix: str = "") -> dict[str, float]:
    """Response lengths in tokens, and the share cut off by the token budget."""
    samples = [s for g in groups for s in g.samples]
    lengths = [len(s.response_ids) for s in samples]
    return {f"{prefix}response_length/mean": float(np.mean(lengths)),
            f"{prefix}response_length/max": float(np.max(lengths)),
            f"{prefix}response_length/clip_frac": float(np.mean([s.finish_reason == "length" for s in samples]))}


def dump_rollouts(path: Path, step: StepRollouts) -> None:
    """Every sample of the step with its prompt id, reward, text, weights version, and whether its group
    was trained on (zero-variance filtering drops some)."""
    trained = {id(g) for g in step.trained}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for group in step.sampled:
            for sample, score in zip(group.samples, group.scores):
                f.write(json.dumps({"id": group.row["id"], "sample": sample.sample_index, "score": score["score"],
                                    "trained": id(group) in trained, "finish": sample.finish_reason,
                                    "weights_version": sample.weights_version, "worker": sample.worker,
                                    "response": sample.text}) + "\n")
