"""The hybrid evaluation's report: groups per source and step count, policies scored by hand, table and plot."""
from __future__ import annotations

import pytest

from home_rl.router.oracle import hindsight_choices
from home_rl.trainer.evaluate import group_keys, markdown_report, plot_report, summarize_policy
from home_rl.router.labels import ExpertStats

ROWS = [
    {"id": "a", "data_source": "math", "extra_info": {"steps": 1}},
    {"id": "b", "data_source": "math", "extra_info": {"steps": 4}},
    {"id": "c", "data_source": "math", "extra_info": {"steps": 5}},
    {"id": "d", "data_source": "extract", "extra_info": {"steps": 1}},
]
# per row: think (accuracy, tokens) and fast (accuracy, tokens)
THINK = [ExpertStats([1, 1], [40, 60]), ExpertStats([1, 0], [80, 80]), ExpertStats([1, 1], [100, 100]),
         ExpertStats([1, 1], [20, 20])]
FAST = [ExpertStats([1, 1], [10, 10]), ExpertStats([0, 0], [6, 6]), ExpertStats([0, 1], [8, 8]),
        ExpertStats([1, 1], [4, 4])]


def test_groups_per_source_and_step_count():
    keys = group_keys(ROWS, steps_at_least=3)
    assert keys[0] == ["all", "math", "math@steps=1"]
    assert keys[1] == ["all", "math", "math@steps=4", "math@steps>=3"]
    assert keys[3] == ["all", "extract"]  # every extract row has 1 step: no breakdown
    assert group_keys(ROWS, steps_at_least=0)[1] == ["all", "math", "math@steps=4"]


def test_policies_scored_by_hand():
    groups = group_keys(ROWS)
    hybrid = summarize_policy(groups, THINK, FAST, ["fast", "think", "think", "fast"])
    assert list(hybrid) == ["all", "extract", "math", "math@steps=1", "math@steps=4", "math@steps=5", "math@steps>=3"]
    # chosen accuracies 1, 0.5, 1, 1; tokens 10, 80, 100, 4
    assert hybrid["all"] == {"accuracy": pytest.approx(3.5 / 4), "think_ratio": 0.5, "mean_tokens": pytest.approx(194 / 4),
                             "prompts": 4}
    assert hybrid["math"]["think_ratio"] == pytest.approx(2 / 3) and hybrid["math@steps>=3"]["think_ratio"] == 1.0
    assert hybrid["math@steps>=3"]["accuracy"] == pytest.approx(0.75) and hybrid["extract"]["mean_tokens"] == 4.0
    think = summarize_policy(groups, THINK, FAST, ["think"] * 4)
    assert think["all"]["accuracy"] == pytest.approx(3.5 / 4) and think["all"]["mean_tokens"] == pytest.approx(62.5)
    # the oracle with the stage's rule (128 tokens, margin 0, length cost 0.1):
    # a: gain 0 -> fast; b: gain 0.5 > 0.058 -> think; c: gain 0.5 > 0.072 -> think; d: gain 0 -> fast
    assert hindsight_choices(THINK, FAST, 128, 0.0, 0.1) == ["fast", "think", "think", "fast"]
    # with a high length cost, c's extra 92 tokens are not worth half a point
    assert hindsight_choices(THINK, FAST, 128, 0.0, 0.8)[2] == "fast"
    with pytest.raises(ValueError):  # one choice per row
        summarize_policy(groups, THINK, FAST, ["fast"])


def test_markdown_and_plot(tmp_path):
    groups = group_keys(ROWS)
    report = {p: summarize_policy(groups, THINK, FAST, c) for p, c in (
        ("hybrid", ["fast", "think", "think", "fast"]), ("always_think", ["think"] * 4),
        ("always_fast", ["fast"] * 4), ("oracle", ["fast", "think", "think", "fast"]))}
    report["info"] = {"checkpoint": "ckpt", "notes": ["a note"]}
    text = markdown_report(report)
    assert "| group | prompts | hybrid (router) | always think | always fast | oracle (hindsight) |" in text
    assert "| math@steps>=3 | 2 | 75.0% | 75.0% | 25.0% | 75.0% |" in text  # accuracy table
    assert "| all | 4 | 48.5 | 62.5 | 7.0 | 48.5 |" in text  # mean tokens table
    assert "type labels" not in text and "- a note" in text
    path = plot_report(report, tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
