"""The prompt loader: batches of rows in a deterministic per-epoch order that resumes exactly.

The order of epoch e is a permutation drawn from (seed, e) alone, so the loader's whole state is
(epoch, position): a checkpoint stores those two numbers, and a restored loader yields exactly the
batches the uninterrupted one would have. With `stratify_by` (a row field such as
`extra_info.steps`), the permutation deals each value's shuffled rows in turn, so every batch holds
the values in equal shares: a batch's mean reward then moves with the policy, not with how many
hard prompts the draw happened to pick.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from home_rl.errors import ConfigError


class PromptLoader:
    """Batches of `prompts_per_step` rows; epochs follow each other for as long as batches are asked for."""

    def __init__(self, rows: Sequence[dict], prompts_per_step: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, stratify_by: str = ""):
        if prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step must be at least 1, got {prompts_per_step}")
        if drop_last and prompts_per_step > len(rows):
            raise ConfigError(f"data.prompts_per_step={prompts_per_step} is more than the {len(rows)} usable rows")
        if not rows:
            raise ConfigError("the prompt loader got no rows")
        self.rows, self.prompts_per_step, self.seed = rows, prompts_per_step, seed
        self.shuffle, self.drop_last, self.stratify_by = shuffle, drop_last, stratify_by
        self.epoch, self.position = 0, 0  # the next batch starts at `position` of epoch `epoch`'s order

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.rows), self.prompts_per_step
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices in the order of `epoch`."""
        if not self.shuffle:
            return np.arange(len(self.rows))
        rng = np.random.default_rng([self.seed, epoch])
        if not self.stratify_by:
            return rng.permutation(len(self.rows))
        strata: dict = {}
        for i, row in enumerate(self.rows):
            strata.setdefault(str(field_of(row, self.stratify_by)), []).append(i)
        decks = [rng.permutation(strata[key]) for key in sorted(strata)]
        dealt = [deck[j] for j in range(max(map(len, decks))) for deck in decks if j < len(deck)]
        return np.asarray(dealt, dtype=np.int64)

    def next_batch(self) -> list[dict]:
        """The next batch of rows, moving on to the next epoch when this one has no full batch left."""
        n, b = len(self.rows), self.prompts_per_step
        if self.position >= n or (self.drop_last and self.position + b > n):
            self.epoch, self.position = self.epoch + 1, 0
        indices = self.order(self.epoch)[self.position:self.position + b]
        self.position += len(indices)
        return [self.rows[i] for i in indices]

    def __iter__(self) -> Iterator[list[dict]]:
        """The remaining batches of the current epoch (then the loader stands at the next epoch's start)."""
        start_epoch = self.epoch
        for _ in range(self.steps_per_epoch - self._steps_done()):
            yield self.next_batch()
        if self.epoch == start_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def _steps_done(self) -> int:
        return -(-self.position // self.prompts_per_step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows),
                "prompts_per_step": self.prompts_per_step, "shuffle": self.shuffle, "stratify_by": self.stratify_by}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved (epoch, position); the data and shuffling must be the ones it was saved with."""
        for key in ("seed", "num_rows", "shuffle", "stratify_by"):
            mine = len(self.rows) if key == "num_rows" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ConfigError(f"cannot resume the prompt loader: checkpoint has {key}={state[key]}, "
                                  f"this run has {mine} (resume with the same data and data.seed)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def field_of(row: dict, path: str):
    """The value at a dotted path of a row (`extra_info.steps`); None where the row lacks it."""
    value = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
