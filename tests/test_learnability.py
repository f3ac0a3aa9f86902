"""The learnability check: its numbers from scored groups, and the warning on a policy whose groups all score alike."""
from __future__ import annotations

import math

import pytest

from home_rl.rollout.types import Sample
from home_rl.trainer.groups import ScoredGroup
from home_rl.trainer.learnability import measure


def group(scores: list[float], logprobs: list[list[float]]) -> ScoredGroup:
    samples = [Sample(0, i, [1], [2] * len(lp), lp, "", "stop", None, 0) for i, lp in enumerate(logprobs)]
    return ScoredGroup({"id": "r", "data_source": "math"}, None, samples,
                       [{"score": s, "accuracy": s} for s in scores])


def test_numbers_from_the_groups():
    check = measure([group([1, 0, 0, 1], [[-0.5, -1.5]] * 4), group([1, 1, 1, 1], [[-0.1]] * 4),
                     group([0, 0, 0, 0], [[-2.0, 0.0, -1.0]] * 4)])
    assert check.prompts == 3 and check.n == 4
    assert check.pass_at_1 == pytest.approx(6 / 12) and check.pass_at_n == pytest.approx(2 / 3)
    assert check.alike_share == pytest.approx(2 / 3)
    # mean negative log-prob of the sampled tokens: (2 + 0.1 + 3) per sample over (2 + 1 + 3) tokens
    assert check.entropy == pytest.approx(5.1 / 6)
    assert set(check.metrics()) == {f"learnability/{k}" for k in ("pass_at_1", "pass_at_n", "alike_share", "entropy",
                                                                    "prompts", "n")}
    assert "pass@1 0.50, pass@4 0.67, 67% of 3 prompt groups score alike" in check.line()


def test_it_warns_when_most_groups_score_alike_and_names_what_to_change():
    certain = [[-1e-3, -2e-3]] * 4  # a policy that samples the same answer every time
    collapsed = measure([group([1, 1, 1, 1], certain)] * 6 + [group([0, 0, 0, 0], certain)] * 3 +
                        [group([1, 0, 1, 1], certain)])
    advice = collapsed.advice(warn_alike=0.6, temperature=1.0)
    assert collapsed.alike_share == pytest.approx(0.9) and collapsed.entropy < 0.01
    assert "90% of prompt groups score all alike" in advice and "rollout.temperature" in advice
    easy = measure([group([1, 1, 1, 1], [[-0.7]] * 4)] * 4)
    assert "too easy" in easy.advice(0.6, 1.0)
    hard = measure([group([0, 0, 0, 0], [[-0.7]] * 4)] * 4)
    assert "too hard" in hard.advice(0.6, 1.0)
    mixed = measure([group([1, 0, 0, 1], [[-0.7]] * 4)] * 3 + [group([1, 1, 1, 1], [[-0.7]] * 4)])
    assert mixed.advice(0.6, 1.0) is None and math.isclose(mixed.alike_share, 0.25)
