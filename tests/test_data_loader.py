"""The prompt loader: deterministic per-epoch order, exact resume from (epoch, position)."""
from __future__ import annotations

import pytest

from data_pipelines import PromptLoader
from home_rl.errors import ConfigError

ROWS = [{"id": f"r{i}"} for i in range(10)]


def ids(batch):
    return [r["id"] for r in batch]


def take(loader, n):
    return [ids(loader.next_batch()) for _ in range(n)]


def test_each_epoch_is_a_seeded_permutation():
    a, b = PromptLoader(ROWS, 3, seed=5), PromptLoader(ROWS, 3, seed=5)
    assert take(a, 9) == take(b, 9)  # same seed, same sequence
    loader = PromptLoader(ROWS, 3, seed=5)
    epochs = [sum(take(loader, 3), []) for _ in range(3)]  # drop_last: 3 batches of 3 per epoch, 1 row left out
    assert all(len(set(e)) == 9 for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    assert take(PromptLoader(ROWS, 3, seed=6), 3) != take(PromptLoader(ROWS, 3, seed=5), 3)
    assert sum(take(PromptLoader(ROWS, 5, shuffle=False), 2), []) == ids(ROWS)


def test_iteration_covers_one_epoch_and_drop_last():
    loader = PromptLoader(ROWS, 4, seed=0)
    assert loader.steps_per_epoch == 2
    first = [ids(b) for b in loader]
    assert len(first) == 2 and loader.epoch == 1 and loader.position == 0
    keep = PromptLoader(ROWS, 4, seed=0, drop_last=False)
    batches = [ids(b) for b in keep]
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == sorted(ids(ROWS))
    assert [len(b) for b in keep] == [4, 4, 2] and keep.epoch == 2


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 7])
def test_restored_loader_yields_the_same_remaining_sequence(stop_after):
    uninterrupted = PromptLoader(ROWS, 4, seed=11)
    expected = take(uninterrupted, 12)

    first = PromptLoader(ROWS, 4, seed=11)
    seen = take(first, stop_after)
    state = dict(first.state_dict())  # what a checkpoint stores
    resumed = PromptLoader(list(ROWS), 4, seed=11)
    resumed.load_state_dict(state)
    assert seen + take(resumed, 12 - stop_after) == expected


def test_resume_mid_epoch_iteration():
    loader = PromptLoader(ROWS, 3, seed=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = [ids(b) for b in it]
    again = PromptLoader(ROWS, 3, seed=2)
    again.load_state_dict(state)
    assert [ids(b) for b in again] == rest


def test_mismatched_resume_and_bad_sizes():
    loader = PromptLoader(ROWS, 3, seed=1)
    with pytest.raises(ConfigError, match="num_rows=10"):
        PromptLoader(ROWS[:8], 3, seed=1).load_state_dict(loader.state_dict())
    with pytest.raises(ConfigError, match="seed=1"):
        PromptLoader(ROWS, 3, seed=2).load_state_dict(loader.state_dict())
    with pytest.raises(ConfigError, match="prompts_per_step=11"):
        PromptLoader(ROWS, 11)
    with pytest.raises(ConfigError, match="at least 1"):
        PromptLoader(ROWS, 0)


def test_stratified_batches_hold_each_value_in_equal_shares_and_resume_exactly():
    rows = [{"id": f"r{i}", "extra_info": {"steps": 1 + i % 4}} for i in range(40)]
    loader = PromptLoader(rows, 8, seed=3, stratify_by="extra_info.steps")
    batches = [loader.next_batch() for _ in range(10)]  # two epochs of 5 batches
    for batch in batches:
        assert sorted(r["extra_info"]["steps"] for r in batch) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert {r["id"] for b in batches[:5] for r in b} == {r["id"] for r in rows}  # still every row once per epoch
    assert [ids(b) for b in batches[:5]] != [ids(b) for b in batches[5:]]  # reshuffled every epoch
    state = PromptLoader(rows, 8, seed=3, stratify_by="extra_info.steps")
    state.next_batch()
    resumed = PromptLoader(rows, 8, seed=3, stratify_by="extra_info.steps")
    resumed.load_state_dict(state.state_dict())
    assert ids(resumed.next_batch()) == ids(batches[1])
    with pytest.raises(ConfigError, match="stratify_by"):
        PromptLoader(rows, 8, seed=3).load_state_dict(state.state_dict())
    mixed = [{"id": "a", "data_source": "math"}, {"id": "b"}, {"id": "c", "data_source": "math"}, {"id": "d"}]
    assert all(len({r.get("data_source") for r in b}) == 2 for b in PromptLoader(mixed, 2, stratify_by="data_source"))
