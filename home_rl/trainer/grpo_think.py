"""The main job's driver: GRPO on the think expert of a HOME model.

One controller process calls three Ray actor groups. Per step:

    prompts -> rollout (think view, vLLM) -> rewards (verifier pool) -> group advantages
            -> old / reference log-probs (learners) -> PPO-style updates (learners, ZeRO-3)
            -> think-expert weights pushed to the rollout workers

A background thread (`RolloutAhead`) owns the rollout engines and the reward pool; this thread owns
the learners. With `trainer.max_staleness = k` step j trains on rollouts of weights version j - k,
made while the learners were busy with the steps before (k = 0: rollout, then update, in turn).

Only the think expert trains by default: the fast expert and the shared weights stay frozen, so
the fast view's outputs do not move. The KL reference is a frozen copy of the initial think
expert inside the same model (`think_ref`), not a second model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_pipelines import PromptLoader, find_splits, load_dataset, render_prompt
from home_rl.config import resolved, save_config
from home_rl.errors import HomeRLError
from home_rl.experts import REFERENCE, THINK
from home_rl.grpo import GRPOConfig, GRPOLoss, group_advantages
from home_rl.tracking import PhaseTimer
from home_rl.trainer.checkpoint import read_state, resolve_resume, save_checkpoint
from home_rl.trainer.grpo_config import GRPOThinkConfig
from home_rl.trainer.rollout_ahead import ReadyBatch, RolloutAhead, WeightsSnapshot
from home_rl.trainer.groups import (ScoredGroup, StepRollouts, dump_rollouts, length_metrics, reward_metrics,
                                    training_sequences)
from home_rl.trainer.startup import check_memory, ensure_ray, job_placement, load_processor, resolve_home_checkpoint, reward_inputs

__all__ = ["GRPOThinkConfig", "GRPOThinkTrainer", "train"]

log = logging.getLogger(__name__)

EVAL_SEED = 999_983  # the held-out evaluation samples with the same seed every time: before and after compare
UPDATE_METRICS = ("loss", "pg_loss", "clip_frac", "ppo_kl", "kl", "entropy", "grad_norm", "lr")
IS_METRICS = ("is_weight_mean", "is_weight_max", "is_truncated_frac")  # the learner's, logged as async/*
PENDING_FILE = "pending_rollouts.pkl"  # a checkpoint's rollouts made ahead of the learners, not yet trained on


class GRPOThinkTrainer:
    def __init__(self, cfg: GRPOThinkConfig):
        self.cfg = cfg = resolved(cfg)  # load_config has resolved it already; a config built in code is resolved here
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.train_shared:
            log.warning("train_shared=true: shared weights train too, so the fast expert's outputs drift")
        make_synthetic_data(cfg)
        self.home_dir = resolve_home_checkpoint(cfg.model.path, "model.path", "recipes/upcycle.py")
        cpus = (cfg.learner.num_learners * cfg.learner.resources.cpus + cfg.rollout.num_workers
                * cfg.rollout.resources.cpus + cfg.reward.num_workers * cfg.reward.resources.cpus + 1)
        check_memory(cfg, "grpo_think", self.home_dir, cpus)  # before config.yaml: it records zero_stage=auto's pick
        save_config(cfg, self.out)

        self.processor = load_processor(self.home_dir)
        log_splits(cfg)
        self.rows = load_dataset(cfg.data, self.processor, experts=(THINK,)).rows
        if not self.rows:
            raise HomeRLError(f"no usable rows in {cfg.data.path}")
        self.loader = PromptLoader(self.rows, cfg.data.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                   stratify_by=cfg.data.stratify_by)
        self.eval_rows: list[dict] = []
        if cfg.eval.path and cfg.eval.rows:
            eval_data = dataclasses.replace(cfg.data, path=cfg.eval.path, max_rows=cfg.eval.rows)
            self.eval_rows = load_dataset(eval_data, self.processor, experts=(THINK,)).rows

        from home_rl.learner import LearnerGroup
        from home_rl.rollout import RolloutPool
        from reward import RewardPool

        ensure_ray(cpus)
        self.placement = self.rollout = self.learner = self.rewards = self.ahead = None
        self.step = 0
        self.pending: list[ReadyBatch] = []  # a resumed checkpoint's rollouts made ahead
        self.engine_weights: WeightsSnapshot | None = None  # what the engines hold beyond the view on disk
        try:
            # every actor's resources are checked before any starts: what the cluster lacks fails now, by name
            self.placement = job_placement(cfg.cluster, learner=cfg.learner, rollout=cfg.rollout, reward=cfg.reward)
            self.rewards = RewardPool(cfg.reward)
            self.rewards.check(self.rows)  # unmapped sources and verifiers that cannot score a real row fail now
            # a restarted worker reloads the engines' current version (never from the learners: they are this
            # thread's, and the rollout thread restarts workers)
            self.rollout = RolloutPool(str(export_think_view(self.home_dir, self.out)), cfg.rollout, self.placement,
                                       weights_source=lambda: self.engine_weights.tensors if self.engine_weights else [])
            self.learner = LearnerGroup(cfg.learner, str(self.home_dir), dtype=cfg.model.dtype,
                                        total_steps=cfg.trainer.total_steps, placement=self.placement)
            resume = resolve_resume(self.out, cfg.trainer.resume)
            if resume is not None:
                self._resume(resume)
        except BaseException:
            self.shutdown()  # the actors started so far, and their placement groups
            raise

    def think_weights(self):
        """What the rollout engines need beyond the view on disk: the learners' current trainable tensors."""
        return self.learner.iter_weights(view=THINK, only_trainable=True)

    def snapshot(self) -> WeightsSnapshot:
        """The learners' trainable think tensors now, on the driver, as version self.step."""
        return WeightsSnapshot(self.step, list(self.think_weights()))

    def _resume(self, folder: Path) -> None:
        state = read_state(folder)
        self.learner.load_checkpoint(str(folder))
        self.loader.load_state_dict(state["loader"])
        random.setstate(_tuple_state(state["python_rng"]))
        np.random.set_state(_numpy_state(state["numpy_rng"]))
        self.step = int(state["step"])
        pending = folder / PENDING_FILE
        if pending.is_file():  # made by older weights that are gone: trained on as they are
            self.pending = pickle.loads(pending.read_bytes())
        # the engines start from the checkpoint's initial think expert: bring them to the resumed weights
        self.push_weights(self.snapshot())
        log.info("resumed from %s at step %d (%d rollout batches made ahead)", folder, self.step, len(self.pending))

    def push_weights(self, snapshot: WeightsSnapshot) -> dict:
        """Load a version into the engines (on the rollout thread once it runs)."""
        if snapshot.tensors is None:  # a step without an update: the same weights under the next version
            self.rollout.version = snapshot.version
            return {"tensors": 0, "bytes": 0, "seconds": 0.0}
        if self.cfg.rollout.sleep_during_updates:
            self.rollout.wake_up()
        report = self.rollout.update_weights(snapshot.tensors, version=snapshot.version)
        self.engine_weights = snapshot
        return report

    # ------------------------------------------------------------------ one step

    def rollout_and_score(self, rows: list[dict], n: int, seed: int, timer: PhaseTimer) -> tuple[list[ScoredGroup], dict]:
        """n samples per prompt of the think view, scored; and the reward pool's metrics."""
        prompts = [render_prompt(row, THINK, self.processor, self.cfg.data) for row in rows]
        with timer("rollout"):
            samples = self.rollout.generate(prompts, n=n, seed=seed).samples
        with timer("reward"):
            scores, pool_metrics = self.rewards.score(reward_inputs(rows, samples, THINK, prompts))
        it = iter(scores)
        groups = [ScoredGroup(row, prompt, group, [next(it) for _ in group])
                  for row, prompt, group in zip(rows, prompts, samples)]
        return groups, pool_metrics

    def collect(self, step: int) -> tuple[StepRollouts, dict]:
        """Step `step`'s prompt groups (with zero-variance filtering, regenerated until the batch is full or the
        limit), and the seconds it took per phase (rollout, reward). Runs on the rollout thread."""
        alg, want, timer = self.cfg.algorithm, self.cfg.data.prompts_per_step, PhaseTimer()
        rounds = 1 + (alg.max_regenerations if alg.filter_zero_variance else 0)
        sampled, trained, first = [], [], None
        for attempt in range(rounds):
            groups, pool_metrics = self.rollout_and_score(self.loader.next_batch(), self.cfg.rollout.n,
                                                          self.cfg.seed * 100_003 + step, timer)
            if first is None:
                first = StepRollouts([], [], sum(g.zero_variance for g in groups) / max(len(groups), 1), 0, pool_metrics)
            sampled += groups
            trained += [g for g in groups if not (alg.filter_zero_variance and g.zero_variance)]
            if len(trained) >= want or not alg.filter_zero_variance:
                break
        rollouts = dataclasses.replace(first, sampled=sampled, trained=trained[:want], regenerations=attempt)
        return rollouts, dict(timer.seconds)

    def rollouts_ahead(self, evaluate_first: bool = False) -> RolloutAhead:
        """The rollout thread, started on first use: from the step and weights version the run is at (with
        `evaluate_first`, a held-out evaluation of that version before any rollout)."""
        if self.ahead is None:
            t = self.cfg.trainer
            self.ahead = RolloutAhead(self.collect, self.push_weights, self.evaluate_engines, t.max_staleness,
                                      first_step=self.step, total_steps=t.total_steps, version=self.step,
                                      pending=self.pending)
            self.pending = []
            if evaluate_first:
                self.ahead.ask_evaluation(self.step)
            self.ahead.start()
            self.last_step_end = time.perf_counter()
        return self.ahead

    def train_step(self) -> dict:
        """One update on the oldest rollouts made ahead; then a checkpoint when one is due, and the new weights
        handed to the rollout thread (with a held-out evaluation on them when one is due: `evaluation()`)."""
        t, timer = self.cfg.trainer, PhaseTimer()
        ahead = self.rollouts_ahead()
        restarts = self.rollout.restarts
        with timer("wait"):
            ready = ahead.next()
        step = ready.rollouts
        dump_rollouts(self.out / "rollouts" / f"step_{self.step + 1:06d}.jsonl", step)
        # reward, accuracy and length of everything sampled: what the policy does, filtered or not
        metrics = {**reward_metrics(step.sampled), **length_metrics(step.sampled),
                   "zero_std_frac": step.zero_std_frac, "regenerations": step.regenerations,
                   **staleness_metrics(step, self.step)}
        if step.trained:
            metrics.update(self.learn(step, timer))
        else:  # every group was filtered out: nothing to learn from this step
            metrics["skipped"] = 1.0
        self.step += 1
        with timer("weight_sync"):  # gathered on the driver: the rollout thread pushes them between engine calls
            weights = self.snapshot() if step.trained else WeightsSnapshot(self.step, None)
        if t.save_every and self.step % t.save_every == 0 and self.step < t.total_steps:
            with timer("checkpoint"):
                self.checkpoint()
        ahead.publish(weights, evaluate=self.evaluation_due())
        metrics.update(self.step_timing(ready, timer))
        generated = sum(len(s.response_ids) for g in step.sampled for s in g.samples)
        prompt_tokens = sum(len(g.prompt.prompt_token_ids) * len(g.samples) for g in step.trained)
        metrics.update({
            **{f"reward_pool/{k.removeprefix('reward/')}": v for k, v in step.reward_pool.items()
               if isinstance(v, (int, float))},  # verifier failures, per-verifier means, ...
            "throughput/generated_tokens_per_s": generated / max(metrics["timing/rollout_s"], 1e-9),
            "throughput/tokens_per_s": (generated + prompt_tokens) / metrics["timing/step_s"],
            "weight_sync/tensors": len(weights.tensors or []),
            "weight_sync/mb": sum(x.numel() * x.element_size() for _, x in weights.tensors or []) / 2**20,
            "rollout/worker_restarts": self.rollout.restarts - restarts,  # workers lost and replaced this step
            "rollout/worker_restarts_total": self.rollout.restarts,
        })
        return metrics

    def learn(self, step: StepRollouts, timer: PhaseTimer) -> dict:
        """Advantages, old and reference log-probs where needed, and the update, on a step's trained groups."""
        alg = self.cfg.algorithm
        metrics = {"reward/trained_mean": float(np.mean([r for g in step.trained for r in g.rewards]))}
        group_ids = [i for i, g in enumerate(step.trained) for _ in g.samples]
        advantages = group_advantages([r for g in step.trained for r in g.rewards], group_ids, alg.norm_adv_by_std)
        seqs = training_sequences(step.trained, advantages, rollout_log_probs=not alg.recompute_old_log_probs,
                                  behaviour_log_probs=alg.rollout_is != "none")
        if self.cfg.rollout.sleep_during_updates:  # colocated: the learners get the engines' GPU memory
            self.rollout.sleep()
        computed, positions = self.learner.tokens_computed, self.learner.positions_computed
        with timer("old_log_prob"):
            if alg.recompute_old_log_probs and not on_policy(alg):
                for seq, lp in zip(seqs, self.learner.log_probs(seqs)):
                    seq.token_data["old_log_probs"] = lp.tolist()
        with timer("reference"):
            if alg.kl_coef > 0:
                ref = self.learner.log_probs([dataclasses.replace(s, route=REFERENCE) for s in seqs])
                for seq, lp in zip(seqs, ref):
                    seq.token_data["ref_log_probs"] = lp.tolist()
        with timer("update"):
            metrics.update(self.update(seqs))
        # every learner pass of the step (old and reference log-probs, update): what shared prefixes cut
        metrics["learner/tokens_computed"] = self.learner.tokens_computed - computed
        metrics["learner/positions_computed"] = self.learner.positions_computed - positions  # padding included
        for key in IS_METRICS:
            if f"actor/{key}" in metrics:
                metrics[f"async/{key}"] = metrics.pop(f"actor/{key}")
        return metrics

    def step_timing(self, ready: ReadyBatch, timer: PhaseTimer) -> dict:
        """timing/*: the rollout's and reward's seconds of this step's batch, the learners' phases, the step's
        wall time since the last one ended, and how long each side sat idle in it."""
        now = time.perf_counter()
        wall = now - self.last_step_end
        learner_busy = sum(timer.seconds.get(p, 0.0) for p in ("old_log_prob", "reference", "update", "weight_sync",
                                                         "checkpoint"))
        out = {f"timing/{k}_s": v for k, v in {**ready.seconds, **timer.seconds}.items()}
        out.update({"timing/step_s": wall, "timing/learner_idle_s": max(0.0, wall - learner_busy),
                    "timing/rollout_idle_s": max(0.0, wall - self.ahead.busy_seconds(self.last_step_end, now))})
        pushed = self.ahead.push_reports_since()
        if pushed:
            out["timing/weight_push_s"] = sum(r["seconds"] for r in pushed)
        self.last_step_end = now
        return out

    def update(self, seqs: list) -> dict[str, float]:
        """alg.ppo_epochs passes over the step's sequences, each in alg.mini_batches optimizer steps; mean metrics."""
        alg, loss = self.cfg.algorithm, GRPOLoss(self.cfg.algorithm)
        totals: dict[str, float] = defaultdict(float)
        updates = 0
        rng = random.Random(self.cfg.seed * 7919 + self.step)
        for _ in range(alg.ppo_epochs):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            for part in np.array_split(order, alg.mini_batches):
                m = self.learner.train_step([seqs[j] for j in part], loss=loss)
                updates += 1
                for key in (*UPDATE_METRICS, *IS_METRICS):
                    if key in m:
                        totals[key] += m[key]
        return {f"actor/{k}": v / updates for k, v in totals.items()}

    def evaluate_engines(self, version: int) -> dict[str, float]:
        """The think view on the held-out prompts, with the engines at `version`: accuracy, reward, format rate
        and length (eval/*). Runs on the rollout thread."""
        timer = PhaseTimer()
        groups, _ = self.rollout_and_score(self.eval_rows, self.cfg.eval.n, EVAL_SEED, timer)
        metrics = {f"eval/{k}": v for k, v in reward_metrics(groups).items()}
        metrics.update(length_metrics(groups, prefix="eval/"))
        metrics.update({"eval/prompts": len(self.eval_rows), "timing/eval_s": timer.elapsed()})
        return metrics

    def evaluation_due(self) -> bool:
        """Whether the weights after self.step updates are evaluated: after the last step, and every eval.every."""
        every = self.cfg.eval.every
        return bool(self.eval_rows) and (self.step == self.cfg.trainer.total_steps or
                                         bool(every and self.step % every == 0))

    def evaluation(self, step: int) -> dict[str, float]:
        """The held-out evaluation of the weights after `step` updates (asked for by train_step, or the baseline
        at 0), also appended to eval.jsonl with the step."""
        metrics, self.last_step_end = self.rollouts_ahead().evaluation(step)  # the next step's time starts there
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        log.info("eval at step %d: accuracy %.3f reward %.3f on %d held-out prompts (%.0f s)", step,
                 metrics.get("eval/accuracy", float("nan")), metrics["eval/reward/mean"], len(self.eval_rows),
                 metrics["timing/eval_s"])
        return metrics

    # ------------------------------------------------------------------ the run

    def checkpoint(self) -> Path:
        """Learners, data position and RNGs at self.step, and the rollouts made ahead that are not trained on yet
        (the rollout thread is drained first: it has made every batch the current engines are due for)."""
        pending = self.rollouts_ahead().drain()
        state = {"loader": self.loader.state_dict(), "python_rng": random.getstate(),
                 "numpy_rng": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
                 "weights_version": self.step, "pending_steps": [b.step for b in pending]}
        files = {PENDING_FILE: pickle.dumps(pending)} if pending else {}
        return save_checkpoint(self.out, self.step, self.learner, state, keep=self.cfg.trainer.keep_checkpoints,
                               files=files)

    def run(self) -> Path:
        from home_rl.plots import plot_metrics
        from home_rl.tracking import MetricsLogger, progress

        t = self.cfg.trainer
        logger = MetricsLogger(self.out, resume_step=self.step, tensorboard=t.tensorboard)
        bar = progress(t.total_steps, initial=self.step, desc="grpo")
        try:
            if self.step == 0 and self.eval_rows:
                self.rollouts_ahead(evaluate_first=True)  # the baseline of eval.jsonl (a resumed run has it already)
                self.evaluation(0)
            else:
                truncate_jsonl(self.out / "eval.jsonl", self.step)  # evaluations the killed run made after it
            while self.step < t.total_steps:
                metrics = self.train_step()
                if self.evaluation_due():
                    metrics.update(self.evaluation(self.step))
                logger.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                len=f"{metrics.get('response_length/mean', 0):.0f}")
                if t.log_every and self.step % t.log_every == 0:
                    log.info("step %d: reward %.3f acc %.3f len %.1f step %.1fs", self.step,
                             metrics.get("reward/mean", float("nan")), metrics.get("accuracy", float("nan")),
                             metrics.get("response_length/mean", 0), metrics.get("timing/step_s", 0))
        finally:
            bar.close()
            logger.close()
        final = Path(self.learner.save_model(str(self.out / "final")))
        plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
        return final

    def shutdown(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        for group in (self.rollout, self.learner, self.rewards, self.placement):
            if group is None:
                continue
            try:
                group.shutdown()
            except Exception:  # best effort at exit: a dead actor must not hide the real error
                log.exception("shutdown of %s failed", type(group).__name__)


# ----------------------------------------------------------------------------- helpers


def make_synthetic_data(cfg: GRPOThinkConfig) -> None:
    """Write the run's synthetic training and held-out rows where the resolved config expects them (once)."""
    from data_pipelines import read_rows
    from data_pipelines.synthetic import generate, make_rows, parse_levels

    train_path, heldout_path = cfg.synthetic_data_path(), cfg.heldout_data_path()
    if Path(cfg.data.path) == train_path and not train_path.is_file():
        generate("math", cfg.synthetic_rows, cfg.seed, train_path.parent, levels=parse_levels(cfg.synthetic_levels))
    if Path(cfg.eval.path or ".") == heldout_path and not heldout_path.is_file():
        # eval.rows problems of the training levels that are not among the training prompts
        train = {r["prompt"] for r in read_rows(cfg.data.path)}
        rows, _ = make_rows("math", 4 * cfg.eval.rows, cfg.seed + 1, levels=parse_levels(cfg.synthetic_levels))
        rows = [r for r in rows if r["prompt"] not in train][:cfg.eval.rows]
        heldout_path.parent.mkdir(parents=True, exist_ok=True)
        heldout_path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def log_splits(cfg: GRPOThinkConfig) -> None:
    """Say which split of a train/test data folder (resolved in GRPOThinkConfig.resolve) trains and which evaluates."""
    splits = find_splits(Path(cfg.data.path).parent)
    if splits is None or splits.train != Path(cfg.data.path):
        return
    if cfg.eval.path and Path(cfg.eval.path) == splits.heldout:
        log.info("data: training on %s; its held-out split %s is the evaluation set (eval.path, at most eval.rows=%d "
                 "rows)", splits.train, splits.heldout, cfg.eval.rows)
    else:
        log.info("data: training on %s; its held-out split %s is not used (eval.path=%r, eval.rows=%d)",
                 splits.train, splits.heldout, cfg.eval.path, cfg.eval.rows)


def export_think_view(home_dir: Path, out: Path) -> Path:
    """The think view of the starting checkpoint, for the rollout engines (made once per run)."""
    from home_rl.model import HomeModel

    view = out / "views" / THINK
    if not (view / "config.json").is_file():  # in the checkpoint's own dtype: each engine casts to rollout.dtype
        HomeModel.from_pretrained(home_dir).export_view(THINK, view)
    return view


def staleness_metrics(step: StepRollouts, version: int) -> dict[str, float]:
    """How many versions older than the weights they train (`version`) the trained samples' weights are."""
    lags = [version - s.weights_version for g in step.trained for s in g.samples]
    return {"async/staleness_max": float(max(lags, default=0)), "async/staleness_mean": float(np.mean(lags)) if lags else 0.0}


def on_policy(alg: GRPOConfig) -> bool:
    """One update per rollout: the learner's log-probs before it are the old policy's (the loss detaches them)."""
    return alg.ppo_epochs == 1 and alg.mini_batches == 1


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a per-step JSONL file up to `step`."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _tuple_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _numpy_state(state: list) -> tuple:
    return (state[0], np.asarray(state[1], dtype=np.uint32), state[2], state[3], state[4])


def train(cfg: GRPOThinkConfig) -> Path:
    trainer = GRPOThinkTrainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
