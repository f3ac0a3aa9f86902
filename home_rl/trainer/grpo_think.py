"""The main job's driver: GRPO on the think expert of a HOME model.

One controller process calls three Ray actor groups. Per step:

    prompts -> rollout (think view, vLLM) -> rewards (verifier pool) -> group advantages
            -> old / reference log-probs (learners) -> PPO-style updates (learners, ZeRO-3)
            -> think-expert weights staged on learner rank 0, sent from there to the engines (vLLM weight transfer)

Two owners split a step. `RolloutSide` (home_rl/trainer/rollout_side.py) owns the prompts, the
engines, the rewards and the thread that makes rollouts; this driver owns the learners and talks to
it through next_batch / publish / evaluation / drain. With `trainer.max_staleness = k` step j trains
on rollouts of weights version j - k, made while the learners were busy with the steps before
(k = 0: rollout, then update, in turn).

Every learner pass computes log-probs at the rollout's temperature, so the policy that trains is the
policy that sampled; each step logs how far the engine's and the learner's log-probs of the sampled
tokens disagree (rollout/logprob_*).

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

from data_pipelines import find_splits, load_dataset
from home_rl.config import resolved
from home_rl.errors import ConfigError, HomeRLError
from home_rl.experts import REFERENCE, THINK
from home_rl.grpo import GRPOConfig, GRPOLoss, group_advantages
from home_rl.model.lora_expert import has_lora_think
from home_rl.rollout.agreement import PREFIX as AGREEMENT, agreement_metrics
from home_rl.tracking import PhaseTimer, truncate_jsonl
from home_rl.trainer.checkpoint import restore_rng, rng_state
from home_rl.trainer.grpo_config import GRPOThinkConfig
from home_rl.trainer.groups import StepRollouts, dump_rollouts, length_metrics, reward_metrics, training_sequences
from home_rl.trainer.job import TrainingJob
from home_rl.trainer.rollout_ahead import ReadyBatch, WeightsSnapshot, kept_versions_from
from home_rl.trainer.startup import job_placement, load_processor, resolve_home_checkpoint, shut_down

__all__ = ["GRPOThinkConfig", "GRPOThinkTrainer", "train"]

log = logging.getLogger(__name__)

UPDATE_METRICS = ("loss", "pg_loss", "clip_frac", "ppo_kl", "kl", "entropy", "grad_norm", "lr")
IS_METRICS = ("is_weight_mean", "is_weight_max", "is_truncated_frac")  # the learner's, logged as async/*
PENDING_FILE = "pending_rollouts.pkl"  # a checkpoint's rollouts made ahead of the learners, not yet trained on


class GRPOThinkTrainer:
    def __init__(self, cfg: GRPOThinkConfig):
        self.cfg = cfg = resolved(cfg)  # load_config has resolved it already; a config built in code is resolved here
        self.out = Path(cfg.output_dir)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.train_shared:
            log.warning("train_shared=true: shared weights train too, so the fast expert's outputs drift")
        make_synthetic_data(cfg)
        self.home_dir = resolve_home_checkpoint(cfg.model.path, "model.path", "recipes/upcycle.py",
                                                lora=cfg.model.lora_spec())
        self.lora = has_lora_think(self.home_dir)  # a LoRA think expert: the engines get its adapter, or it merged
        if cfg.train_shared and self.lora:
            raise ConfigError(f"train_shared=true with {self.home_dir}, whose think expert is a LoRA adapter over fast: "
                              "the shared weights are fast's too, and the engines receive the adapter alone")
        cpus = (cfg.learner.num_learners * cfg.learner.resources.cpus + cfg.rollout.num_workers
                * cfg.rollout.resources.cpus + cfg.reward.num_workers * cfg.reward.resources.cpus + 1)
        self.placement = self.rollout = self.learner = None
        self.job = TrainingJob(cfg, self.home_dir, cpus)
        self.step = 0
        self.last_step_end = time.perf_counter()
        try:
            processor = load_processor(self.home_dir)
            log_splits(cfg)
            rows = load_dataset(cfg.data, processor, experts=(THINK,)).rows
            if not rows:
                raise HomeRLError(f"no usable rows in {cfg.data.path}")
            eval_rows: list[dict] = []
            if cfg.eval.path and cfg.eval.rows:
                eval_data = dataclasses.replace(cfg.data, path=cfg.eval.path, max_rows=cfg.eval.rows)
                eval_rows = load_dataset(eval_data, processor, experts=(THINK,)).rows
            self.has_eval = bool(eval_rows)
            from home_rl.learner import LearnerGroup
            from home_rl.trainer.rollout_side import RolloutSide

            # every actor's resources are checked before any starts: what the cluster lacks fails now, by name
            self.placement = job_placement(cfg.cluster, learner=cfg.learner, rollout=cfg.rollout, reward=cfg.reward)
            self.rollout = RolloutSide(cfg, self.home_dir, self.placement, processor, rows, eval_rows)
            self.learner = LearnerGroup(cfg.learner, str(self.home_dir), dtype=cfg.model.dtype,
                                        total_steps=cfg.trainer.total_steps, placement=self.placement)
            self.rollout.attach(self.learner.weight_sender())  # new versions go from learner rank 0 to the engines
            state = self.job.restore(self.learner)
            if state is not None:
                self._resume(state)
        except BaseException:
            self.shutdown()  # the actors started so far, their placement groups, and the Ray runtime
            raise

    def snapshot(self, changed: bool = True) -> WeightsSnapshot:
        """What the rollout engines need beyond the view on disk, as version self.step: the learners' trainable
        think tensors, staged on their rank 0 (`changed` False: the last version's, a step without an update)."""
        self.learner.stage_weights(self.step, view=THINK, only_trainable=True, changed=changed,
                                   keep_from=kept_versions_from(self.step, self.cfg.trainer.max_staleness),
                                   merge_adapter=self.lora and not self.cfg.rollout.serves_adapter)
        return WeightsSnapshot(self.step, changed)

    def _resume(self, state: dict) -> None:
        folder = self.job.resume_from
        restore_rng(state)
        self.step = int(state["step"])
        pending = folder / PENDING_FILE
        # made by older weights that are gone: trained on as they are
        self.rollout.restore(state["loader"], pickle.loads(pending.read_bytes()) if pending.is_file() else [])
        log.info("resumed from %s at step %d (%d rollout batches made ahead)", folder, self.step,
                 len(self.rollout.pending))

    def start_rollouts(self, evaluate_first: bool = False) -> None:
        """Start the rollout side at the run's step; a resumed run's engines first load the learners' weights
        (they start from the checkpoint's initial think expert)."""
        weights = self.snapshot() if self.step > 0 else None
        self.rollout.start(self.step, self.step, weights=weights, evaluate_first=evaluate_first)
        self.last_step_end = time.perf_counter()

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        """One update on the oldest rollouts made ahead; then a checkpoint when one is due, and the new weights
        published to the rollout side (with a held-out evaluation on them when one is due)."""
        t, timer = self.cfg.trainer, PhaseTimer()
        if not self.rollout.started:
            self.start_rollouts()
        with timer("wait"):
            ready = self.rollout.next_batch()
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
        with timer("weight_sync"):  # gathered onto learner rank 0: the rollout thread has it send them between engine calls
            weights = self.snapshot(changed=bool(step.trained))
        if t.save_every and self.step % t.save_every == 0 and self.step < t.total_steps:
            with timer("checkpoint"):
                self.checkpoint()
        self.rollout.publish(weights, evaluate=self.evaluation_due())
        metrics.update(self.step_timing(ready, timer))
        generated = sum(len(s.response_ids) for g in step.sampled for s in g.samples)
        prompt_tokens = sum(len(g.prompt.prompt_token_ids) * len(g.samples) for g in step.trained)
        metrics.update({
            **{f"reward_pool/{k.removeprefix('reward/')}": v for k, v in step.reward_pool.items()
               if isinstance(v, (int, float))},  # verifier failures, per-verifier means, ...
            "throughput/generated_tokens_per_s": generated / max(metrics["timing/rollout_s"], 1e-9),
            "throughput/tokens_per_s": (generated + prompt_tokens) / metrics["timing/step_s"],
            "rollout/worker_restarts": step.worker_restarts,  # workers lost and replaced while making this batch
            "rollout/worker_restarts_total": step.worker_restarts_total,
        })
        return metrics

    def learn(self, step: StepRollouts, timer: PhaseTimer) -> dict:
        """Advantages, old and reference log-probs where needed, and the update, on a step's trained groups."""
        alg, temperature = self.cfg.algorithm, self.cfg.rollout.temperature
        metrics = {"reward/trained_mean": float(np.mean([r for g in step.trained for r in g.rewards]))}
        group_ids = [i for i, g in enumerate(step.trained) for _ in g.samples]
        advantages = group_advantages([r for g in step.trained for r in g.rewards], group_ids, alg.norm_adv_by_std)
        seqs = training_sequences(step.trained, advantages, rollout_log_probs=not alg.recompute_old_log_probs)
        computed, positions = self.learner.tokens_computed, self.learner.positions_computed
        with timer("old_log_prob"):
            if alg.recompute_old_log_probs and not on_policy(alg):
                for seq, lp in zip(seqs, self.learner.log_probs(seqs, temperature=temperature)):
                    seq.token_data["old_log_probs"] = lp.tolist()
        with timer("reference"):
            if alg.kl_coef > 0:
                ref = self.learner.log_probs([dataclasses.replace(s, route=REFERENCE) for s in seqs],
                                             temperature=temperature)
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

    def update(self, seqs: list) -> dict[str, float]:
        """alg.ppo_epochs passes over the step's sequences, each in alg.mini_batches optimizer steps; mean metrics,
        and the engine-learner agreement measured in the first call's forward passes (before any optimizer step:
        the weights that sampled, k versions later in asynchronous mode)."""
        alg, loss = self.cfg.algorithm, GRPOLoss(self.cfg.algorithm)
        totals: dict[str, float] = defaultdict(float)
        agreement: dict[str, float] = {}
        updates = 0
        rng = random.Random(self.cfg.seed * 7919 + self.step)
        for _ in range(alg.ppo_epochs):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            for part in np.array_split(order, alg.mini_batches):
                m = self.learner.train_step([seqs[j] for j in part], loss=loss, temperature=self.cfg.rollout.temperature)
                if not updates:
                    agreement = agreement_metrics({k: v for k, v in m.items() if k.startswith(AGREEMENT)})
                updates += 1
                for key in (*UPDATE_METRICS, *IS_METRICS):
                    if key in m:
                        totals[key] += m[key]
        return {**{f"actor/{k}": v / updates for k, v in totals.items()}, **agreement}

    def step_timing(self, ready: ReadyBatch, timer: PhaseTimer) -> dict:
        """timing/*: the rollout's and reward's seconds of this step's batch, the learners' phases, the step's
        wall time since the last one ended, and how long each side sat idle in it."""
        now = time.perf_counter()
        wall = now - self.last_step_end
        learner_busy = sum(timer.seconds.get(p, 0.0) for p in ("old_log_prob", "reference", "update", "weight_sync",
                                                         "checkpoint"))
        out = {f"timing/{k}_s": v for k, v in {**ready.seconds, **timer.seconds}.items()}
        out.update({"timing/step_s": wall, "timing/learner_idle_s": max(0.0, wall - learner_busy),
                    "timing/rollout_idle_s": max(0.0, wall - self.rollout.busy_seconds(self.last_step_end, now))})
        pushed = self.rollout.push_reports_since()
        if pushed:  # the versions the engines loaded since the last step: straight from learner rank 0
            out["timing/weight_push_s"] = sum(r["seconds"] for r in pushed)
            out["weight_sync/tensors"] = sum(r["tensors"] for r in pushed)
            out["weight_sync/buckets"] = sum(r["buckets"] for r in pushed)
            out["weight_sync/mb"] = sum(r["bytes"] for r in pushed) / 2**20
        self.last_step_end = now
        return out

    def evaluation_due(self) -> bool:
        """Whether the weights after self.step updates are evaluated: after the last step, and every eval.every."""
        every = self.cfg.eval.every
        return self.has_eval and (self.step == self.cfg.trainer.total_steps or bool(every and self.step % every == 0))

    def evaluation(self, step: int) -> tuple[dict[str, float], float]:
        """The held-out evaluation of the weights after `step` updates (asked for by train_step, or the baseline
        at 0), appended to eval.jsonl; and when it ended (perf_counter)."""
        log.info("eval at step %d: the think view on the held-out prompts ...", step)
        metrics, ended = self.rollout.evaluation(step)
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        log.info("eval at step %d: accuracy %.3f reward %.3f on %d held-out prompts (%.0f s)", step,
                 metrics.get("eval/accuracy", float("nan")), metrics["eval/reward/mean"], metrics["eval/prompts"],
                 metrics["timing/eval_s"])
        return metrics, ended

    # ------------------------------------------------------------------ the run

    def checkpoint(self) -> Path:
        """Learners, data position and RNGs at self.step, and the rollouts made ahead that are not trained on yet
        (the rollout side is drained first: it has made every batch the current engines are due for)."""
        drained = self.rollout.drain()
        state = {"loader": drained.loader_state, **rng_state(), "weights_version": self.step,
                 "pending_steps": [b.step for b in drained.pending]}
        files = {PENDING_FILE: pickle.dumps(drained.pending)} if drained.pending else {}
        return self.job.checkpoint(self.step, self.learner, state, files=files)

    def run(self) -> Path:
        from home_rl.plots import plot_metrics

        t = self.cfg.trainer
        steps = self.job.step_log(self.step, "grpo", step_line)
        try:
            if self.step == 0 and t.learnability_check:
                self.check_learnability(steps)
            if self.step == 0 and self.has_eval:
                self.start_rollouts(evaluate_first=True)  # the baseline of eval.jsonl (a resumed run has it already)
                _, self.last_step_end = self.evaluation(0)  # the first step's time starts where it ended
                steps.restart_clock()
            else:
                truncate_jsonl(self.out / "eval.jsonl", self.step)  # evaluations the killed run made after it
                self.start_rollouts()
            while self.step < t.total_steps:
                metrics = self.train_step()
                if self.evaluation_due():
                    evaluated, self.last_step_end = self.evaluation(self.step)
                    metrics.update(evaluated)
                steps.log(self.step, metrics)
        finally:
            steps.close()
        final = self.job.save_final(self.learner)
        plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
        return final

    def check_learnability(self, steps) -> None:
        """Measure the starting policy on training prompts (learnability/* at step 0); warn, naming what to change,
        when most groups would carry no signal."""
        t, start = self.cfg.trainer, time.perf_counter()
        check = self.rollout.measure_learnability(t.learnability_prompts)
        steps.record(0, check.metrics())
        log.info("learnability: %s (%.0f s)", check.line(), time.perf_counter() - start)
        advice = check.advice(t.learnability_warn_alike, self.cfg.rollout.temperature)
        if advice:
            log.warning("learnability: %s", advice)

    def shutdown(self) -> None:
        shut_down(self.rollout, self.learner, self.placement)
        self.job.close()


# ----------------------------------------------------------------------------- helpers


def step_line(m: dict) -> str:
    """The console's words for a GRPO step."""
    parts = [f"reward {m.get('reward/mean', float('nan')):.3f}"]
    if "accuracy" in m:
        parts.append(f"acc {m['accuracy']:.3f}")
    parts += [f"zero-std {m.get('zero_std_frac', float('nan')):.2f}", f"len {m.get('response_length/mean', 0):.0f}"]
    if "eval/accuracy" in m:
        parts.append(f"held-out acc {m['eval/accuracy']:.3f}")
    return ", ".join(parts)


def make_synthetic_data(cfg: GRPOThinkConfig) -> None:
    """Write the run's synthetic training and held-out rows where the resolved config expects them (once)."""
    from data_pipelines.synthetic import ensure_math_rows

    train_path, heldout_path = cfg.synthetic_data_path(), cfg.heldout_data_path()
    if Path(cfg.data.path) == train_path:
        ensure_math_rows(train_path, heldout_path if Path(cfg.eval.path or ".") == heldout_path else None,
                         cfg.synthetic_rows, cfg.eval.rows, cfg.seed, cfg.synthetic_levels)


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


def staleness_metrics(step: StepRollouts, version: int) -> dict[str, float]:
    """How many versions older than the weights they train (`version`) the trained samples' weights are."""
    lags = [version - s.weights_version for g in step.trained for s in g.samples]
    return {"async/staleness_max": float(max(lags, default=0)), "async/staleness_mean": float(np.mean(lags)) if lags else 0.0}


def on_policy(alg: GRPOConfig) -> bool:
    """One update per rollout: the learner's log-probs before it are the old policy's (the loss detaches them)."""
    return alg.ppo_epochs == 1 and alg.mini_batches == 1


def train(cfg: GRPOThinkConfig) -> Path:
    trainer = GRPOThinkTrainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
