"""The label rule against hand computations, ties included, and the labelled records it writes."""
from __future__ import annotations

import json

import pytest

from home_rl.errors import HomeRLError
from home_rl.router.labels import (ExpertStats, derive_label, expert_stats, label_record, net_gains, read_labels,
                                   relabel, think_threshold, write_labels)

# acc_think, acc_fast, len_think, len_fast, max_tokens, margin, length_cost -> threshold (by hand), label
TABLE = [
    # threshold 0.1 + 0.5 * 40/100 = 0.3; gain 0.5 beats it
    (1.00, 0.50, 60, 20, 100, 0.1, 0.5, 0.30, "think"),
    # same lengths, gain 0.25 does not reach 0.3
    (0.75, 0.50, 60, 20, 100, 0.1, 0.5, 0.30, "fast"),
    # gain 0.25 equals 0.1 + 0.5 * 30/100 = 0.25: a tie goes to fast
    (0.50, 0.25, 50, 20, 100, 0.1, 0.5, 0.25, "fast"),
    # gain 1.0 - 0.7 is 0.30000000000000004 in floats against a margin of 0.3: still a tie, still fast
    (1.00, 0.70, 20, 20, 100, 0.3, 0.0, 0.30, "fast"),
    # equal accuracy, think shorter: the threshold is -0.5 * 40/100 = -0.2 and think wins (as good and cheaper)
    (0.50, 0.50, 10, 50, 100, 0.0, 0.5, -0.20, "think"),
    # both wrong, same length: gain 0 = threshold 0, a tie
    (0.00, 0.00, 30, 30, 100, 0.0, 0.5, 0.00, "fast"),
    # think worse
    (0.25, 0.75, 30, 10, 128, 0.0, 0.1, 0.1 * 20 / 128, "fast"),
    # no length cost: any real gain pays
    (0.25, 0.00, 128, 5, 128, 0.0, 0.0, 0.00, "think"),
]


@pytest.mark.parametrize("acc_t,acc_f,len_t,len_f,max_tokens,margin,cost,threshold,label", TABLE)
def test_label_rule_matches_hand_computation(acc_t, acc_f, len_t, len_f, max_tokens, margin, cost, threshold, label):
    assert think_threshold(len_t, len_f, max_tokens, margin, cost) == pytest.approx(threshold)
    assert derive_label(acc_t, acc_f, len_t, len_f, max_tokens, margin, cost) == label


def test_expert_stats_from_reward_results():
    results = [{"score": 1.1, "accuracy": 1.0, "format": 1.0}, {"score": 0.1, "accuracy": 0.0, "format": 1.0},
               {"score": 0.0, "accuracy": 0.0, "format": 0.0}, {"score": 1.0, "accuracy": 1.0, "format": 0.0}]
    stats = expert_stats(results, [10, 20, 30, 40])
    assert stats.accuracy == 0.5 and stats.mean_tokens == 25.0 and stats.format_rate == 0.5 and stats.n == 4
    # no correctness verifier (accuracy None): the reward is the score
    only_reward = expert_stats([{"score": 0.25, "accuracy": None}, {"score": 0.75, "accuracy": None}], [1, 3])
    assert only_reward.accuracy == 0.5 and only_reward.format_rate is None
    with pytest.raises(ValueError, match="2 scores for 3 samples"):
        expert_stats(results[:2], [1, 2, 3])


def test_label_records_keep_every_number_and_round_trip(tmp_path):
    row = {"id": "m1", "data_source": "math", "extra_info": {"steps": 4}}
    think = ExpertStats([1.0, 1.0, 0.0, 1.0], [60, 70, 50, 60])
    fast = ExpertStats([0.0, 1.0, 0.0, 0.0], [10, 10, 12, 8])
    record = label_record(row, think, fast, max_response_tokens=128, margin=0.1, length_cost=0.5, type_label="think")
    assert record["label"] == "think"  # gain 0.5 > 0.1 + 0.5 * 50 / 128 = 0.295
    assert record["acc_think"] == 0.75 and record["acc_fast"] == 0.25 and record["gain"] == 0.5
    assert record["len_think"] == 60 and record["len_fast"] == 10
    assert record["threshold"] == pytest.approx(0.1 + 0.5 * 50 / 128)
    assert record["steps"] == 4 and record["type_label"] == "think" and record["scores_fast"] == [0.0, 1.0, 0.0, 0.0]
    path = write_labels(tmp_path / "labels.jsonl", [record, {**record, "id": "m2", "label": "fast"}])
    assert [r["id"] for r in read_labels(path)] == ["m1", "m2"]
    assert json.loads(path.read_text().splitlines()[0]) == record
    with pytest.raises(ValueError, match="no samples from the fast expert"):
        label_record(row, think, ExpertStats([], []), 128, 0.0, 0.1)


def test_relabel_with_other_knobs_and_net_gains():
    row = {"id": "m1", "data_source": "math"}
    record = label_record(row, ExpertStats([1.0], [60]), ExpertStats([0.0], [10]), max_response_tokens=100, margin=0.0,
                          length_cost=0.1)
    assert record["label"] == "think" and net_gains([record]) == pytest.approx([1.0 - 0.1 * 50 / 100])
    # a margin of 1.0: the same numbers fall short (gain 1 against a threshold of 1.05), and every number follows
    strict = relabel(record, margin=1.0, length_cost=0.1)
    assert strict["label"] == "fast" and strict["threshold"] == pytest.approx(1.05) and strict["margin"] == 1.0
    assert net_gains([strict]) == pytest.approx([-0.05]) and record["label"] == "think"  # the input is left alone
    bare = {"id": "x", "label": "think"}  # labels made elsewhere: kept as they are, and no gains to fit
    assert relabel(bare, 1.0, 0.1) is bare and net_gains([record, bare]) is None


def test_bad_label_files_are_clear_errors(tmp_path):
    with pytest.raises(HomeRLError, match="labels file not found"):
        read_labels(tmp_path / "nope.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "label": "think"}\n{"id": \n')
    with pytest.raises(HomeRLError, match="line 2: not JSON"):
        read_labels(tmp_path / "broken.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "label": "maybe"}\n')
    with pytest.raises(HomeRLError, match="line 1: a label record needs an id and a label of fast or think"):
        read_labels(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert read_labels(tmp_path / "empty.jsonl") == []
