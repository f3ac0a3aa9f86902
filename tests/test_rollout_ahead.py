"""The rollout thread's schedule: which weights version makes each step's batch, and in what order it pushes,
evaluates and generates. The engine here is a recorder of calls (the real one runs in test_grpo_think)."""
from __future__ import annotations

import threading
import time

import pytest

from home_rl.trainer.rollout_ahead import RolloutAhead, WeightsSnapshot, kept_versions_from, staged_versions


class Engines:
    """Stands in for the rollout and reward pools: it records every call with the version it ran on."""

    def __init__(self, version: int = 0, fail_at_step: int = -1, seconds: float = 0.0):
        self.version, self.calls, self.fail_at_step, self.seconds = version, [], fail_at_step, seconds
        self.lock = threading.Lock()

    def collect(self, step: int):
        if step == self.fail_at_step:
            raise RuntimeError(f"rollout of step {step} failed")
        time.sleep(self.seconds)
        with self.lock:
            self.calls.append(("collect", step, self.version))
        return f"batch {step}", {"rollout": self.seconds}

    def push(self, snapshot: WeightsSnapshot) -> dict:
        with self.lock:
            self.calls.append(("push", snapshot.version, self.version))
            self.version = snapshot.version
        return {"version": snapshot.version, "seconds": 0.0}

    def evaluate(self, version: int) -> dict:
        with self.lock:
            self.calls.append(("eval", version, self.version))
        return {"eval/accuracy": float(version)}


def drive(staleness: int, steps: int, eval_every: int = 0, first_step: int = 0, pending=None,
          engines: Engines | None = None) -> tuple[Engines, list]:
    """The trainer's side of the loop: take a batch, 'update', publish the next version."""
    engines = engines or Engines(version=first_step)
    ahead = RolloutAhead(engines.collect, engines.push, engines.evaluate, staleness, first_step=first_step,
                         total_steps=steps, version=first_step, pending=pending)
    ahead.start()
    trained = []
    try:
        for step in range(first_step, steps):
            batch = ahead.next()
            assert batch.step == step
            trained.append((batch.step, batch.version))
            version = step + 1
            due = bool(eval_every and version % eval_every == 0) or version == steps
            ahead.publish(WeightsSnapshot(version), evaluate=due)
            if due:
                metrics, ended = ahead.evaluation(version)
                assert metrics == {"eval/accuracy": float(version)} and ended <= time.perf_counter()
    finally:
        ahead.close()
    return engines, trained


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_step_j_trains_on_rollouts_of_version_j_minus_k(staleness):
    engines, trained = drive(staleness, steps=6)
    assert trained == [(j, max(0, j - staleness)) for j in range(6)]
    collects = [(step, version) for kind, step, version in engines.calls if kind == "collect"]
    assert collects == trained  # made in step order, each by the version it is stamped with


def test_synchronous_order_is_push_evaluate_then_generate():
    engines, _ = drive(0, steps=4, eval_every=2)
    assert engines.calls == [("collect", 0, 0), ("push", 1, 0), ("collect", 1, 1), ("push", 2, 1), ("eval", 2, 2),
                             ("collect", 2, 2), ("push", 3, 2), ("collect", 3, 3), ("push", 4, 3), ("eval", 4, 4)]


def test_generation_overlaps_the_update_when_stale_rollouts_are_allowed():
    engines = Engines(seconds=0.2)
    ahead = RolloutAhead(engines.collect, engines.push, engines.evaluate, 1, first_step=0, total_steps=3, version=0)
    ahead.start()
    try:
        first = ahead.next()
        time.sleep(0.5)  # the 'update' of step 0: meanwhile step 1's batch is made from version 0
        assert [c for c in engines.calls if c[0] == "collect"] == [("collect", 0, 0), ("collect", 1, 0)]
        assert first.version == 0 and ahead.next().version == 0
        start = time.perf_counter()
        assert ahead.busy_seconds(start - 0.7, start) >= 0.35  # it worked while the main thread slept
    finally:
        ahead.close()


def test_drain_returns_the_batches_made_ahead_and_a_resumed_thread_continues_the_schedule():
    engines = Engines()
    ahead = RolloutAhead(engines.collect, engines.push, engines.evaluate, 2, first_step=0, total_steps=6, version=0)
    ahead.start()
    try:
        for step in range(3):
            ahead.next()
            ahead.publish(WeightsSnapshot(step + 1))
        ahead.next()  # step 3 (version 1)
        pending = ahead.drain()  # what a checkpoint at step 4 would keep, before version 4 is published
        assert [(b.step, b.version) for b in pending] == [(4, 2), (5, 3)]
        assert ahead.engine_version == 3 and ahead.next_step == 6  # nothing more to make
    finally:
        ahead.close()
    # resumed at step 4 with that batch: the engines hold version 4 from the learners' checkpoint
    resumed, trained = drive(2, steps=6, first_step=4, pending=pending, engines=Engines(version=4))
    assert trained == [(4, 2), (5, 3)]
    assert [c for c in resumed.calls if c[0] == "collect"] == []  # step 5's batch was made before the checkpoint
    uninterrupted, all_steps = drive(2, steps=6)
    assert all_steps[4:] == trained


def test_a_failed_rollout_is_raised_in_the_main_thread():
    engines = Engines(fail_at_step=1)
    with pytest.raises(RuntimeError, match="rollout of step 1 failed"):
        drive(1, steps=4, engines=engines)


def test_learner_rank_0_keeps_the_versions_an_engine_may_still_hold():
    """Synchronous: once version v is staged the engines wait for it, so nothing older is kept. With k > 0 the
    thread may still generate with v - 1 - k (the last trained batch's version), which a restart would reload."""
    assert kept_versions_from(5, 0) == 5 and staged_versions(0) == 1
    assert kept_versions_from(5, 1) == 3 and staged_versions(1) == len(range(3, 6))
    assert kept_versions_from(1, 2) == 0

