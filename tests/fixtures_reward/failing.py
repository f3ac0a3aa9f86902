"""Reward functions that go wrong in the ways tests/test_reward_failures.py checks are loud."""


def no_style(text, expected, weight):
    """Three positional arguments of no framework's names: no calling style fits."""
    return 1.0


def always_raises(response, ground_truth, *, data_source, extra_info):
    raise KeyError("solution")  # e.g. a verifier written for rows with another schema


def returns_text(response, ground_truth, *, data_source, extra_info):
    return "correct"


def crashes_on_late_rows(response, ground_truth, *, data_source, extra_info):
    """Passes the start-up probe and the first step, then raises on the rows of the second: a bug only some rows reach."""
    if extra_info.get("late"):
        raise ValueError(f"cannot parse answer {ground_truth!r}")
    return 0.25


def handles_late_rows(response, ground_truth, *, data_source, extra_info):
    """crashes_on_late_rows, fixed."""
    return 0.75 if extra_info.get("late") else 0.25


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl style; raises on responses that start with 'bad'."""
    if solution_str.startswith("bad"):
        raise RuntimeError(f"cannot score {solution_str!r}")
    return 1.0
