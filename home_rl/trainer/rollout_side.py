"""The rollout side of GRPO, owned by one object: prompts, engines, rewards, evaluation rows and the thread.

`RolloutSide` holds the prompt loader, the processor, the rollout pool (vLLM engines), the reward pool,
the held-out rows and the scheduling thread (`RolloutAhead`). Once started, only that thread touches
the engines and the loader; the driver's main thread, which owns the learners, talks to it through
five calls:

    side = RolloutSide(cfg, home_dir, placement, processor, rows, eval_rows)
    side.attach(learners.weight_sender())          # the engines load new versions from the learners' rank 0
    side.start(step, version, weights=None, evaluate_first=True)   # weights: what a resumed run loads first
    batch = side.next_batch()                      # the oldest batch made ahead (ReadyBatch)
    side.publish(WeightsSnapshot(v), evaluate=False)
    metrics, ended = side.evaluation(v)            # a held-out evaluation asked for by publish / start
    drained = side.drain()                         # at a checkpoint: batches made ahead and the loader's position

On colocated GPUs (`rollout.sleep_during_updates`) the thread puts the engines to sleep after each batch
and wakes them to load the next version, so the learners get their memory while they update.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from data_pipelines import PromptLoader, render_prompt
from home_rl.experts import FAST, THINK
from home_rl.tracking import PhaseTimer
from home_rl.trainer.groups import ScoredGroup, StepRollouts, length_metrics, reward_metrics
from home_rl.trainer.rollout_ahead import ReadyBatch, RolloutAhead, WeightsSnapshot
from home_rl.trainer.startup import reward_inputs, shut_down

if TYPE_CHECKING:
    from home_rl.trainer.learnability import Learnability

log = logging.getLogger(__name__)

EVAL_SEED = 999_983  # the held-out evaluation samples with the same seed every time: before and after compare
LEARNABILITY_SEED = 999_979  # the learnability check's prompts and samples: apart from every step's


@dataclasses.dataclass
class Drained:
    pending: list[ReadyBatch]  # batches made ahead of the learners, not yet trained on (oldest first)
    loader_state: dict  # the prompt loader's position after them


class RolloutSide:
    def __init__(self, cfg: Any, home_dir: Path, placement: Any, processor: Any, rows: list[dict],
                 eval_rows: list[dict]):
        """Start the reward pool (its verifiers probed on real rows) and the rollout workers on the think view of
        `home_dir`; `cfg` is the GRPO config (data, rollout, reward, algorithm, trainer, eval, seed)."""
        from home_rl.rollout import RolloutPool
        from reward import RewardPool

        self.cfg, self.processor, self.rows, self.eval_rows = cfg, processor, rows, eval_rows
        self.loader = PromptLoader(rows, cfg.data.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                   stratify_by=cfg.data.stratify_by)
        self.pending: list[ReadyBatch] = []
        self.ahead: Optional[RolloutAhead] = None
        self.rewards = self.pool = None
        try:
            # written while the reward pool starts
            exported = export_think_view(home_dir, Path(cfg.output_dir), cfg.rollout.serves_adapter)
            self.rewards = RewardPool(cfg.reward)
            self.rewards.check(rows)  # unmapped sources and verifiers that cannot score a real row fail now
            self.pool = RolloutPool(str(exported.wait()), cfg.rollout, placement, adapter=exported.adapter)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ the main thread's calls

    def restore(self, loader_state: dict, pending: list[ReadyBatch]) -> None:
        """A resumed run's loader position and the batches its checkpoint made ahead (before `start`)."""
        self.loader.load_state_dict(loader_state)
        self.pending = list(pending)

    def measure_learnability(self, prompts: int) -> "Learnability":
        """The starting policy on `prompts` training prompts (a seeded sample, the loader untouched), `rollout.n`
        samples each at the rollout's settings (before `start`: the engines are this call's alone)."""
        from home_rl.trainer.learnability import measure

        rows = random.Random(self.cfg.seed + LEARNABILITY_SEED).sample(self.rows, min(prompts, len(self.rows)))
        groups, _ = self._rollout_and_score(rows, self.cfg.rollout.n, LEARNABILITY_SEED, PhaseTimer())
        self.pool.reset_caches()  # the run then samples as if the check had not run
        return measure(groups)

    def attach(self, sender: Any) -> None:
        """The engines load every later version from `sender` (the learners' rank 0), a restarted one too."""
        self.pool.attach(sender)

    def start(self, step: int, version: int, weights: Optional[WeightsSnapshot] = None,
              evaluate_first: bool = False) -> None:
        """Start the thread at `step` with the engines at `version`: `weights` (a resumed run's learners) are loaded
        first; `evaluate_first` evaluates that version before any rollout."""
        t = self.cfg.trainer
        self.ahead = RolloutAhead(self._collect, self._push, self._evaluate, t.max_staleness, first_step=step,
                                  total_steps=t.total_steps, version=version, pending=self.pending, reload=weights)
        self.pending = []
        if evaluate_first:
            self.ahead.ask_evaluation(version)
        self.ahead.start()

    @property
    def started(self) -> bool:
        return self.ahead is not None

    def next_batch(self) -> ReadyBatch:
        return self.ahead.next()

    def publish(self, weights: WeightsSnapshot, evaluate: bool = False) -> None:
        self.ahead.publish(weights, evaluate=evaluate)

    def evaluation(self, version: int) -> tuple[dict, float]:
        """The held-out metrics of `version` (blocks until made), and when the evaluation ended (perf_counter)."""
        return self.ahead.evaluation(version)

    def drain(self) -> Drained:
        """Wait until the thread needs newer weights; then what a checkpoint keeps of this side."""
        pending = self.ahead.drain()  # the thread is idle from here until the next publish
        return Drained(pending, self.loader.state_dict())

    def busy_seconds(self, start: float, end: float) -> float:
        return self.ahead.busy_seconds(start, end)

    def push_reports_since(self) -> list[dict]:
        return self.ahead.push_reports_since()

    def shutdown(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        shut_down(self.pool, self.rewards)

    # ------------------------------------------------------------------ the thread's work

    def _push(self, snapshot: WeightsSnapshot) -> dict:
        """Load a version into the engines."""
        if self.cfg.rollout.sleep_during_updates:
            self.pool.wake_up()
        if not snapshot.changed:  # a step without an update: the same weights under the next version
            self.pool.version = snapshot.version
            return {"tensors": 0, "bytes": 0, "buckets": 0, "seconds": 0.0, "version": snapshot.version}
        return self.pool.sync(snapshot.version)

    def _rollout_and_score(self, rows: list[dict], n: int, seed: int,
                           timer: PhaseTimer) -> tuple[list[ScoredGroup], dict]:
        """n samples per prompt of the think view, scored; and the reward pool's metrics."""
        prompts = [render_prompt(row, THINK, self.processor, self.cfg.data) for row in rows]
        with timer("rollout"):
            samples = self.pool.generate(prompts, n=n, seed=seed).samples
        with timer("reward"):
            scores, pool_metrics = self.rewards.score(reward_inputs(rows, samples, THINK, prompts))
        it = iter(scores)
        groups = [ScoredGroup(row, prompt, group, [next(it) for _ in group])
                  for row, prompt, group in zip(rows, prompts, samples)]
        return groups, pool_metrics

    def _collect(self, step: int) -> tuple[StepRollouts, dict]:
        """Step `step`'s prompt groups (with zero-variance filtering, regenerated until the batch is full or the
        limit), and the seconds it took per phase (rollout, reward)."""
        alg, want, timer = self.cfg.algorithm, self.cfg.data.prompts_per_step, PhaseTimer()
        rounds = 1 + (alg.max_regenerations if alg.filter_zero_variance else 0)
        restarts = self.pool.restarts
        sampled, trained, first = [], [], None
        for attempt in range(rounds):
            groups, pool_metrics = self._rollout_and_score(self.loader.next_batch(), self.cfg.rollout.n,
                                                           self.cfg.seed * 100_003 + step, timer)
            if first is None:
                first = StepRollouts([], [], sum(g.zero_variance for g in groups) / max(len(groups), 1), 0, pool_metrics)
            sampled += groups
            trained += [g for g in groups if not (alg.filter_zero_variance and g.zero_variance)]
            if len(trained) >= want or not alg.filter_zero_variance:
                break
        if self.cfg.rollout.sleep_during_updates:  # colocated: the learners get the engines' GPU memory
            self.pool.sleep()
        rollouts = dataclasses.replace(first, sampled=sampled, trained=trained[:want], regenerations=attempt,
                                       worker_restarts=self.pool.restarts - restarts,
                                       worker_restarts_total=self.pool.restarts)
        return rollouts, dict(timer.seconds)

    def _evaluate(self, version: int) -> dict[str, float]:
        """The think view on the held-out prompts, with the engines at `version`: accuracy, reward, format rate
        and length (eval/*)."""
        timer = PhaseTimer()
        groups, _ = self._rollout_and_score(self.eval_rows, self.cfg.eval.n, EVAL_SEED, timer)
        metrics = {f"eval/{k}": v for k, v in reward_metrics(groups).items()}
        metrics.update(length_metrics(groups, prefix="eval/"))
        metrics.update({"eval/prompts": len(self.eval_rows), "timing/eval_s": timer.elapsed()})
        return metrics


class ExportedView:
    """The think view being written: `wait()` returns its folder once it is complete. A LoRA think expert's view
    is the fast view plus `adapter` (the checkpoint's PEFT adapter folder), which the engines apply themselves."""

    def __init__(self, view: Path, pending: Any = None, adapter: Optional[str] = None):
        self.view, self.pending, self.adapter = view, pending, adapter

    def wait(self) -> Path:
        import ray

        if self.pending is not None:
            ray.get(self.pending)
            self.pending = None
        return self.view


def export_think_view(home_dir: Path, out: Path, as_adapter: bool = False) -> ExportedView:
    """The think view of the starting checkpoint, for the rollout engines (made once per run), written by a Ray
    worker process of its own while the caller goes on: the driver never loads the HOME model. A LoRA think
    expert's view is the fast view and its adapter (`as_adapter`), or its merged view."""
    import ray

    from home_rl.console import actor_env
    from home_rl.model.lora_expert import ADAPTER_DIR, has_lora_think

    lora = as_adapter and has_lora_think(home_dir)
    expert = FAST if lora else THINK
    adapter = str(home_dir / ADAPTER_DIR) if lora else None
    view = out / "views" / expert
    if (view / "config.json").is_file():  # in the checkpoint's own dtype: each engine casts to rollout.dtype
        return ExportedView(view, adapter=adapter)
    task = ray.remote(num_cpus=0, max_calls=1)(_write_view)  # max_calls: its process exits after it
    return ExportedView(view, task.options(runtime_env={"env_vars": actor_env()}).remote(str(home_dir), str(view),
                                                                                       expert), adapter)


def _write_view(home_dir: str, view: str, expert: str) -> None:
    from home_rl.console import capture_output
    from home_rl.model import HomeModel

    capture_output("export-view")
    HomeModel.from_pretrained(home_dir).export_view(expert, view)
