"""The router's operating point (home_rl/router/operating_point.py) and the evaluation's trade-off curve
(home_rl/trainer/pareto.py), computed by hand on small sets."""
from __future__ import annotations

import random

import pytest

from home_rl.errors import ConfigError
from home_rl.router.operating_point import (ALWAYS_THINK, ARGMAX_THRESHOLD, Budget, Outcome, calibrate, operating_point,
                                            parse_budget, routing_curve, threshold_of)
from home_rl.router.labels import ExpertStats
from home_rl.router.oracle import cross_fitted, hindsight_choices
from home_rl.trainer.pareto import frontier_accuracy_at, group_frontier, pareto_report, random_accuracy_at

# four prompts: thinking pays on the first two (p high), costs on the last two
OUTCOMES = [Outcome(1.0, 0.0, 100, 20), Outcome(1.0, 0.5, 80, 20), Outcome(0.5, 0.5, 60, 20), Outcome(1.0, 1.0, 40, 20)]
P_THINK = [0.9, 0.7, 0.4, 0.2]


def test_budgets_parse_or_name_the_field():
    assert parse_budget("") is None
    assert parse_budget("tokens=0.75") == Budget("tokens", 0.75)
    assert parse_budget("accuracy=1") == Budget("accuracy", 1.0)
    for bad in ("tokens=1.5", "tokens=0", "accuracy=-1", "speed=1", "tokens", "tokens=x", "accuracy=nan"):
        with pytest.raises(ConfigError, match=r"^router.budget="):
            parse_budget(bad)


def test_the_curve_by_hand():
    curve = routing_curve(P_THINK, OUTCOMES)
    assert [p.think_ratio for p in curve] == [0, 0.25, 0.5, 0.75, 1.0]
    assert [p.threshold for p in curve] == [1.0, 0.8, 0.55, 0.30000000000000004, ALWAYS_THINK]
    assert [p.accuracy for p in curve] == [0.5, 0.75, 0.875, 0.875, 0.875]
    assert [p.mean_tokens for p in curve] == [20, 40, 55, 65, 70]
    assert curve[-1].token_ratio == 1.0 and curve[0].token_ratio == pytest.approx(20 / 70)
    # a threshold routes exactly the prompts above it
    for point in curve:
        assert sum(p > point.threshold for p in P_THINK) == round(point.think_ratio * 4)


def test_equal_probabilities_are_one_step():
    curve = routing_curve([0.6, 0.6, 0.1], OUTCOMES[:3])
    assert [p.think_ratio for p in curve] == [0, 2 / 3, 1.0]


def test_calibration_meets_the_budget():
    curve = routing_curve(P_THINK, OUTCOMES)
    at_tokens = calibrate(curve, Budget("tokens", 0.8))  # at most 56 tokens: the most accurate is 2 prompts thinking
    assert (at_tokens.think_ratio, at_tokens.mean_tokens) == (0.5, 55)
    assert calibrate(curve, Budget("tokens", 0.1)).think_ratio == 0  # nothing meets it: always-fast
    cheapest = calibrate(curve, Budget("accuracy", 0))  # always-think's accuracy at the fewest tokens
    assert (cheapest.think_ratio, cheapest.accuracy) == (0.5, 0.875)
    assert calibrate(curve, Budget("accuracy", 20)).think_ratio == 0.25  # 0.75 >= 0.875 - 0.2


def test_operating_point_and_efforts():
    point = operating_point(P_THINK, OUTCOMES, Budget("accuracy", 0))
    assert point["threshold"] == 0.55 and point["budget"] == "accuracy=0" and point["prompts"] == 4
    low, medium, high = (point["efforts"][e] for e in ("low", "medium", "high"))
    assert low >= medium >= high == ALWAYS_THINK  # thinking ratios that do not fall from low to high
    assert low == 1.0  # half of medium's 35 extra tokens over always-fast is 37.5: only always-fast (20) fits
    argmax = operating_point(P_THINK, OUTCOMES, None)
    assert argmax["threshold"] == ARGMAX_THRESHOLD and argmax["measured"]["think_ratio"] == 0.5
    config = {"router_operating_point": point}
    assert threshold_of(config) == threshold_of(config, "medium") == 0.55
    assert threshold_of(config, "high") == ALWAYS_THINK and threshold_of(config, "low") == low
    assert threshold_of({}) == threshold_of({}, "low") == ARGMAX_THRESHOLD  # a checkpoint from before: its argmax


def test_random_routing_and_the_group_frontier_by_hand():
    assert random_accuracy_at(OUTCOMES, 0.0) == 0.5 and random_accuracy_at(OUTCOMES, 1.0) == 0.875
    groups = ["a", "a", "b", "b"]  # a: thinking gains 0.375 for +35 tokens; b: nothing for +15
    front = group_frontier(groups, OUTCOMES)
    assert [(p["think_groups"], p["accuracy"], p["mean_tokens"]) for p in front] == [([], 0.5, 20), (["a"], 0.875, 55)]
    assert frontier_accuracy_at(front, 54) == 0.5 and frontier_accuracy_at(front, 55) == 0.875
    assert frontier_accuracy_at(front, 10) is None
    policies = {"hybrid": {"accuracy": 0.875, "mean_tokens": 55, "think_ratio": 0.5},
                "always_think": {"accuracy": 0.875, "mean_tokens": 70, "think_ratio": 1.0}}
    report = pareto_report(P_THINK, OUTCOMES, groups, 0.55, policies)
    assert report["pareto"]["operating_point"]["token_ratio"] == pytest.approx(55 / 70)
    assert report["group_frontier"]["hybrid_minus_frontier"] == 0.0
    assert report["pareto"]["share_above_random"] == 1.0  # a router that ranks well lies above the line


def test_a_router_that_ranks_badly_lies_below_random():
    rng = random.Random(0)
    outcomes = [Outcome(rng.random(), rng.random(), 50 + rng.random() * 50, 20) for _ in range(50)]
    gains = [o.acc_think - o.acc_fast for o in outcomes]
    policies = {"hybrid": {"accuracy": 0, "mean_tokens": 1, "think_ratio": 0},
                "always_think": {"accuracy": 0, "mean_tokens": 1, "think_ratio": 1}}
    good = pareto_report(gains, outcomes, ["x"] * 50, 0.0, policies)["pareto"]
    bad = pareto_report([-g for g in gains], outcomes, ["x"] * 50, 0.0, policies)["pareto"]
    assert good["min_lead_over_random"] > 0 and good["share_above_random"] == 1.0
    assert bad["share_above_random"] == 0.0


def test_the_cross_fitted_oracle_by_hand():
    rule = (160, 0.1, 0.1)  # think needs a gain above 0.1 + 0.1 * 40 / 160 = 0.125
    think, fast = ExpertStats([1, 0, 1, 1], [50] * 4), ExpertStats([0, 0, 1, 0], [10] * 4)
    # picked on [1, 0] vs [0, 0]: think, scored on [1, 1]; picked on [1, 1] vs [1, 0]: think, scored on [1, 0]
    [c] = cross_fitted([think], [fast], *rule)
    assert (c.accuracy, c.tokens, c.think) == (0.75, 50, 1.0)
    lucky = ExpertStats([1, 0, 0, 0], [50] * 4), ExpertStats([0, 0, 0, 0], [10] * 4)
    # hindsight sees think's one lucky answer and thinks (0.25 right); cross-fitted, the luck is in one half only
    assert hindsight_choices(*([x] for x in lucky), *rule) == ["think"]
    [c] = cross_fitted(*([x] for x in lucky), *rule)
    assert (c.accuracy, c.tokens, c.think) == (0.0, 30, 0.5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        cross_fitted([ExpertStats([1], [5])], [ExpertStats([1], [5])], *rule)
