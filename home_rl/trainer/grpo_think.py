"""The main job's driver: GRPO on the think expert of a HOME model.

One controller process calls three Ray actor groups. Per step:

    prompts -> rollout (think view, vLLM) -> rewards (verifier pool) -> group advantages
            -> old / reference log-probs (learners) -> PPO-style updates (learners, ZeRO-3)
            -> think-expert weights pushed to the rollout workers

Only the think expert trains by default: the fast expert and the shared weights stay frozen, so
the fast view's outputs do not move. The KL reference is a frozen copy of the initial think
expert inside the same model (`think_ref`), not a second model.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import DataConfig, PromptLoader, load_dataset, render_prompt
from home_rl.cluster import ClusterConfig, Placement
from home_rl.config import ModelConfig, save_config
from home_rl.errors import ConfigError, HomeRLError
from home_rl.grpo import GRPOConfig, GRPOLoss, group_advantages, zero_variance_groups
from home_rl.learner.batch import Sequence
from home_rl.trainer.checkpoint import read_state, resolve_resume, save_checkpoint
from home_rl.learner.config import LearnerConfig
from home_rl.trainer.config import TrainerConfig
from home_rl.rollout.config import RolloutConfig
from reward import RewardConfig

log = logging.getLogger(__name__)

THINK, REFERENCE = "think", "think_ref"
EVAL_SEED = 999_983  # the held-out evaluation samples with the same seed every time: before and after compare


# The embedded default is sized for 2 CPU cores and 24 GB (measured): a learner's micro-batch of 8
# sequences of 192 tokens peaks at 5.9 GB (16: 9.2 GB, and no faster), and a step of 16 prompts x 4
# samples (plus one regeneration round) takes about 77 s on a quiet machine, so 20 steps with start-up
# and both evaluations took 29 min 51 s. On levels 1-4 with lr 3e-5, held-out accuracy rose 37.5% -> 59.5%
# and the mean reward of the last 5 steps beat the first 5 by 0.18 (8 prompts x 8 samples: 48.5%, and
# no reward trend); with an earlier cold start, 6e-5 lowered held-out accuracy where 3e-5 raised it.


def _data_defaults() -> DataConfig:
    # Every step gets the same mix of step counts: with 8 prompts of random levels, the share of hard
    # ones moved a step's mean reward by +-0.1 (measured), as much as 20 steps of learning.
    # 16 prompts of 4 samples instead of 8 of 8: the same compute, and a step's mean reward varies
    # with which prompts it drew far more than with the samples of one prompt (most groups agree).
    return DataConfig(prompts_per_step=16, stratify_by="extra_info.steps")


def _rollout_defaults() -> RolloutConfig:
    # the worked trace of a six-step problem is about 120 tokens; n=4: see _data_defaults
    return RolloutConfig(n=4, max_response_tokens=160)


def _learner_defaults() -> LearnerConfig:
    return LearnerConfig(num_learners=2, trainable="think", lr=3e-5, micro_batch_size=8)


def _algorithm_defaults() -> GRPOConfig:
    # Most groups of 4 samples score all alike at this size (38-81% a step, measured): drop them and sample
    # one more round, so each update spends its compute on groups that carry a signal (DAPO).
    return GRPOConfig(filter_zero_variance=True, max_regenerations=1)


def _reward_defaults() -> RewardConfig:
    return RewardConfig(num_workers=1)  # math-verify scores a step's 128 samples in ~0.2 s: one worker is plenty


def _trainer_defaults() -> TrainerConfig:
    return TrainerConfig(total_steps=20, save_every=5)


@dataclasses.dataclass
class EvalConfig:
    path: str = ""  # held-out prompts (any data format); "": with synthetic training data, `rows` new synthetic problems, else no evaluation
    rows: int = 200  # held-out prompts scored by the think view before the first step and after the last (0: no evaluation)
    every: int = 0  # also evaluate every N steps (0: only before and after)
    n: int = 1  # samples per prompt (rollout's sampling settings, a fixed seed)


@dataclasses.dataclass
class GRPOThinkConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the HOME checkpoint to train (smollm2: the embedded default, built by its cold start when absent)
    data: DataConfig = dataclasses.field(default_factory=_data_defaults)  # prompts (data.path empty: synthetic multi-step math made for this run)
    rollout: RolloutConfig = dataclasses.field(default_factory=_rollout_defaults)  # vLLM workers serving the think view
    reward: RewardConfig = dataclasses.field(default_factory=_reward_defaults)  # verifiers per data_source and their worker pool
    learner: LearnerConfig = dataclasses.field(default_factory=_learner_defaults)  # DeepSpeed ZeRO-3 learners
    algorithm: GRPOConfig = dataclasses.field(default_factory=_algorithm_defaults)  # advantages, policy loss, KL, PPO epochs
    trainer: TrainerConfig = dataclasses.field(default_factory=_trainer_defaults)  # steps, checkpoints, resume, logging
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)  # disaggregated or colocated placement, resource wait
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # held-out accuracy of the think view: eval.jsonl, eval/* metrics
    train_shared: bool = False  # also train shared weights (attention, embeddings, ...): the fast expert then drifts
    synthetic_rows: int = 2000  # rows of synthetic math made when data.path is empty
    synthetic_levels: str = "1-4"  # math steps of the synthetic rows (1-6 exist; 5-6 are rarely solved by the embedded default)
    seed: int = 0  # seeds data order, sampling and every actor
    output_dir: str = "outputs/grpo_think"  # config.yaml, metrics.jsonl, checkpoints/, final/, plots/


# ----------------------------------------------------------------------------- set-up


def ensure_ray(cfg: GRPOThinkConfig) -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS), or start a local runtime sized for this job."""
    from home_rl.trainer import startup

    # Ray schedules by logical CPUs: declare enough for every actor, then size threads per actor.
    need = (cfg.learner.num_learners * cfg.learner.cpus_per_learner + cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
            + cfg.reward.num_workers * cfg.reward.cpus_per_worker + 1)
    startup.ensure_ray(need)


def resolve_home_checkpoint(cfg: GRPOThinkConfig) -> Path:
    """The HOME checkpoint to start from; the embedded default is built (cold start + upcycle) when missing."""
    from home_rl.model import is_home_checkpoint
    from home_rl.model.embedded import EMBEDDED

    if cfg.model.path in EMBEDDED:
        from home_rl.trainer.cold_start import ensure_cold_start

        return Path(ensure_cold_start(cfg.model.path))
    path = Path(cfg.model.path)
    if not path.is_dir():
        raise ConfigError(f"model.path: no such folder {cfg.model.path!r}")
    if not is_home_checkpoint(path):
        raise ConfigError(f"model.path={cfg.model.path!r} is a dense checkpoint: GRPO trains the think expert of a "
                          f"HOME checkpoint; make one with recipes/upcycle.py model.path={cfg.model.path}")
    return path


def make_synthetic_data(cfg: GRPOThinkConfig, out: Path) -> str:
    from data_pipelines.synthetic import generate, parse_levels

    folder = out / "data"
    if not (folder / "data.jsonl").is_file():
        generate("math", cfg.synthetic_rows, cfg.seed, folder, levels=parse_levels(cfg.synthetic_levels))
    return str(folder / "data.jsonl")


def make_heldout_data(cfg: GRPOThinkConfig, out: Path) -> str:
    """eval.rows synthetic problems of the training levels that are not among the training prompts."""
    import json

    from data_pipelines import read_rows
    from data_pipelines.synthetic import make_rows, parse_levels

    path = out / "eval_data" / "data.jsonl"
    if not path.is_file():
        train = {r["prompt"] for r in read_rows(cfg.data.path)}
        rows, _ = make_rows("math", 4 * cfg.eval.rows, cfg.seed + 1, levels=parse_levels(cfg.synthetic_levels))
        rows = [r for r in rows if r["prompt"] not in train][:cfg.eval.rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_processor(path: Path) -> Any:
    """The model's processor (Qwen2.5-VL) or tokenizer (text models)."""
    import transformers

    from home_rl.model.architectures import architecture_of, read_config_json

    if architecture_of(read_config_json(path)).multimodal:
        return transformers.AutoProcessor.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def export_think_view(home_dir: Path, out: Path) -> Path:
    """The think view of the starting checkpoint, for the rollout engines (made once per run)."""
    import torch

    from home_rl.model import HomeModel

    view = out / "views" / THINK
    if not (view / "config.json").is_file():
        HomeModel.from_pretrained(home_dir, dtype=torch.float32).export_view(THINK, view)
    return view


# ----------------------------------------------------------------------------- the trainer


class GRPOThinkTrainer:
    def __init__(self, cfg: GRPOThinkConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.train_shared:
            log.warning("train_shared=true: shared weights train too, so the fast expert's outputs drift")
            cfg.learner.trainable = "think,shared"  # the shared weights are in the think view: they sync too
        if cfg.cluster.mode == "colocated":
            cfg.rollout.sleep_during_updates = True
        if cfg.algorithm.kl_coef > 0 and not any(c.startswith(REFERENCE + "=") for c in cfg.learner.frozen_copies):
            cfg.learner.frozen_copies = [*cfg.learner.frozen_copies, f"{REFERENCE}={THINK}"]
        synthetic = not cfg.data.path
        if synthetic:
            cfg.data.path = make_synthetic_data(cfg, self.out)
        cfg.data.seed = cfg.seed
        if synthetic and cfg.eval.rows and not cfg.eval.path:
            cfg.eval.path = make_heldout_data(cfg, self.out)
        save_config(cfg, self.out)

        self.home_dir = resolve_home_checkpoint(cfg)
        self.processor = load_processor(self.home_dir)
        data = load_dataset(cfg.data, self.processor, experts=(THINK,))
        self.rows = data.rows
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

        ensure_ray(cfg)
        self.placement = self.rollout = self.learner = self.rewards = None
        self.step = 0
        try:
            # every actor's resources are checked before any starts: what the cluster lacks fails now, by name
            self.placement = Placement(cfg.cluster, learner=cfg.learner, rollout=cfg.rollout, reward=cfg.reward)
            self.rewards = RewardPool(cfg.reward)
            self.rewards.validate_sources({r["data_source"] for r in self.rows})  # unmapped sources fail now
            self.rollout = RolloutPool(str(export_think_view(self.home_dir, self.out)), cfg.rollout, self.placement,
                                       weights_source=self.think_weights)
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

    def _resume(self, folder: Path) -> None:
        state = read_state(folder)
        self.learner.load_checkpoint(str(folder))
        self.loader.load_state_dict(state["loader"])
        random.setstate(_tuple_state(state["python_rng"]))
        np.random.set_state(_numpy_state(state["numpy_rng"]))
        self.step = int(state["step"])
        # the engines start from the checkpoint's initial think expert: bring them to the resumed weights
        self.rollout.update_weights(self.think_weights(), version=self.step)
        log.info("resumed from %s at step %d", folder, self.step)

    # ------------------------------------------------------------------ one step

    def rollout_and_score(self, rows: list[dict]) -> tuple[list, list, dict]:
        """Render, generate n samples per prompt, score them. Returns (rendered, groups of scored samples, stats)."""
        rendered = [render_prompt(row, THINK, self.processor, self.cfg.data) for row in rows]
        t0 = time.perf_counter()
        result = self.rollout.generate(rendered, n=self.cfg.rollout.n, seed=self.cfg.seed * 100_003 + self.step)
        t1 = time.perf_counter()
        groups, reward_metrics = self.score(rows, result.samples)
        t2 = time.perf_counter()
        return rendered, groups, {"rollout_s": t1 - t0, "reward_s": t2 - t1, "rollout": result.stats,
                                  "reward": reward_metrics}

    def score(self, rows: list[dict], samples: list[list]) -> tuple[list, dict]:
        """Each prompt's samples paired with their reward dicts, and the reward pool's metrics."""
        to_score = [{"id": f"{row['id']}#{s.sample_index}", "response": s.text, "ground_truth": row["answer"],
                     "data_source": row["data_source"], "extra_info": {**(row.get("extra_info") or {}), "expert": THINK}}
                    for row, group in zip(rows, samples) for s in group]
        scores, reward_metrics = self.rewards.score(to_score)
        it = iter(scores)
        return [[(s, next(it)) for s in group] for group in samples], reward_metrics

    def collect(self) -> tuple[list[dict], list, list, dict]:
        """A step's prompt groups; with zero-variance filtering, regenerate until the batch is full (or the limit).

        stats["sampled"] holds (rows, groups) of everything generated this step, kept or not: the
        policy's reward is measured on those, not on the filtered batch.
        """
        cfg = self.cfg.algorithm
        want = self.cfg.data.prompts_per_step
        rows, rendered, groups, timing = [], [], [], defaultdict(float)
        sampled_rows, sampled_groups = [], []
        first_zero_std = None
        stats = {}
        for attempt in range(1 + (cfg.max_regenerations if cfg.filter_zero_variance else 0)):
            batch_rows = self.loader.next_batch()
            r, g, s = self.rollout_and_score(batch_rows)
            timing["rollout_s"] += s["rollout_s"]
            timing["reward_s"] += s["reward_s"]
            stats = stats or s
            sampled_rows += batch_rows
            sampled_groups += g
            flat = [(i, score["score"]) for i, group in enumerate(g) for _, score in group]
            zero = zero_variance_groups([x[1] for x in flat], [x[0] for x in flat])
            if first_zero_std is None:
                first_zero_std = len(zero) / max(len(g), 1)
            keep = [i for i in range(len(g)) if not (cfg.filter_zero_variance and i in zero)]
            rows += [batch_rows[i] for i in keep]
            rendered += [r[i] for i in keep]
            groups += [g[i] for i in keep]
            if len(groups) >= want or not cfg.filter_zero_variance:
                break
        stats.update(timing, zero_std_frac=first_zero_std, regenerations=attempt, kept_groups=len(groups),
                     sampled=(sampled_rows, sampled_groups))
        return rows[:want], rendered[:want], groups[:want], stats

    def train_step(self) -> dict:
        cfg, alg = self.cfg, self.cfg.algorithm
        start = time.perf_counter()
        restarts = self.rollout.restarts
        _, rendered, groups, stats = self.collect()
        sampled_rows, sampled_groups = stats["sampled"]
        self._dump_rollouts(sampled_rows, sampled_groups, trained={id(g) for g in groups})
        # reward, accuracy and length of everything sampled: what the policy does, filtered or not
        metrics: dict[str, float] = self._reward_metrics(sampled_rows, sampled_groups)
        lengths = [len(s.response_ids) for group in sampled_groups for s, _ in group]
        metrics.update({"response_length/mean": float(np.mean(lengths)), "response_length/max": float(np.max(lengths)),
                        "response_length/clip_frac": float(np.mean([s.finish_reason == "length"
                                                                    for g in sampled_groups for s, _ in g])),
                        "zero_std_frac": stats["zero_std_frac"], "regenerations": stats["regenerations"]})
        if not groups:  # every group was filtered out: nothing to learn from this step
            self.step += 1
            return {**metrics, "skipped": 1.0, "timing/step_s": time.perf_counter() - start}
        metrics["reward/trained_mean"] = float(np.mean([score["score"] for g in groups for _, score in g]))

        rewards = [score["score"] for group in groups for _, score in group]
        group_ids = [i for i, group in enumerate(groups) for _ in group]
        advantages = group_advantages(rewards, group_ids, alg.norm_adv_by_std)
        seqs = []
        for (i, (sample, _)), adv in zip([(i, x) for i, group in enumerate(groups) for x in group], advantages):
            n = len(sample.response_ids)
            token_data = {"advantages": [float(adv)] * n}
            if not alg.recompute_old_log_probs:
                token_data["old_log_probs"] = list(sample.logprobs)
            seqs.append(Sequence(prompt_ids=rendered[i].prompt_token_ids, response_ids=list(sample.response_ids),
                                 route=THINK, token_data=token_data, mm_inputs=rendered[i].mm_inputs,
                                 mm_token_type_ids=rendered[i].mm_token_type_ids))

        self.rollout.sleep()  # colocated on CUDA: the learners get the engines' GPU memory (else a no-op)
        t0 = time.perf_counter()
        if alg.recompute_old_log_probs and not on_policy(alg):
            for seq, lp in zip(seqs, self.learner.log_probs(seqs)):
                seq.token_data["old_log_probs"] = lp.tolist()
        t1 = time.perf_counter()
        if alg.kl_coef > 0:
            ref = self.learner.log_probs([dataclasses.replace(s, route=REFERENCE) for s in seqs])
            for seq, lp in zip(seqs, ref):
                seq.token_data["ref_log_probs"] = lp.tolist()
        t2 = time.perf_counter()

        loss = GRPOLoss(alg)
        update: dict[str, float] = defaultdict(float)
        updates = 0
        rng = random.Random(self.cfg.seed * 7919 + self.step)
        for _ in range(alg.ppo_epochs):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            for part in np.array_split(order, alg.mini_batches):
                m = self.learner.train_step([seqs[j] for j in part], loss=loss)
                updates += 1
                for key in ("loss", "pg_loss", "clip_frac", "ppo_kl", "kl", "entropy", "grad_norm", "lr"):
                    if key in m:
                        update[key] += m[key]
        t3 = time.perf_counter()
        self.rollout.wake_up()
        sync = self.rollout.update_weights(self.think_weights(), version=self.step + 1)
        t4 = time.perf_counter()
        self.step += 1

        metrics.update({f"actor/{k}": v / updates for k, v in update.items()})
        generated = sum(lengths)
        step_s = t4 - start
        metrics.update({
            "timing/rollout_s": stats["rollout_s"], "timing/reward_s": stats["reward_s"],
            "timing/old_log_prob_s": t1 - t0, "timing/reference_s": t2 - t1, "timing/update_s": t3 - t2,
            "timing/weight_sync_s": t4 - t3, "timing/step_s": step_s,
            "throughput/generated_tokens_per_s": generated / max(stats["rollout_s"], 1e-9),
            "throughput/tokens_per_s": (generated + sum(len(s.prompt_ids) for s in seqs)) / step_s,
            "weight_sync/tensors": sync["tensors"], "weight_sync/mb": sync["bytes"] / 2**20,
            "rollout/worker_restarts": self.rollout.restarts - restarts,  # workers lost and replaced this step
            "rollout/worker_restarts_total": self.rollout.restarts,
        })
        for key, value in (stats.get("reward") or {}).items():  # verifier failures, per-verifier means, ...
            if isinstance(value, (int, float)):
                metrics[f"reward_pool/{key.removeprefix('reward/')}"] = value
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The think view on the held-out prompts: accuracy, reward, format rate and length (eval/*),
        also appended to eval.jsonl with the step."""
        import json

        if not self.eval_rows:
            return {}
        start = time.perf_counter()
        rendered = [render_prompt(row, THINK, self.processor, self.cfg.data) for row in self.eval_rows]
        result = self.rollout.generate(rendered, n=self.cfg.eval.n, seed=EVAL_SEED)
        groups, _ = self.score(self.eval_rows, result.samples)
        metrics = {f"eval/{k}": v for k, v in self._reward_metrics(self.eval_rows, groups).items()}
        metrics["eval/response_length/mean"] = float(np.mean([len(s.response_ids) for g in groups for s, _ in g]))
        metrics["eval/prompts"] = len(self.eval_rows)
        metrics["timing/eval_s"] = time.perf_counter() - start
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        log.info("eval at step %d: accuracy %.3f reward %.3f on %d held-out prompts (%.0f s)", self.step,
                 metrics.get("eval/accuracy", float("nan")), metrics["eval/reward/mean"], len(self.eval_rows),
                 metrics["timing/eval_s"])
        return metrics

    def _dump_rollouts(self, rows: list[dict], groups: list, trained: set[int]) -> None:
        """rollouts/step_N.jsonl: every sample of the step with its prompt id, reward, text, and whether
        its group was trained on (zero-variance filtering drops some); `self.step` is not yet advanced."""
        import json

        folder = self.out / "rollouts"
        folder.mkdir(exist_ok=True)
        with open(folder / f"step_{self.step + 1:06d}.jsonl", "w") as f:
            for row, group in zip(rows, groups):
                for sample, score in group:
                    f.write(json.dumps({"id": row["id"], "sample": sample.sample_index, "score": score["score"],
                                        "trained": id(group) in trained, "finish": sample.finish_reason,
                                        "weights_version": sample.weights_version, "response": sample.text}) + "\n")

    @staticmethod
    def _reward_metrics(rows: list[dict], groups: list) -> dict[str, float]:
        """Reward, accuracy and format rate, overall and per data_source."""
        per_source: dict[str, list[dict]] = defaultdict(list)
        for row, group in zip(rows, groups):
            per_source[row["data_source"]] += [score for _, score in group]
        out = {}
        everything = [s for scores in per_source.values() for s in scores]
        for name, scores in [("", everything)] + [(f"/{src}", s) for src, s in sorted(per_source.items())]:
            values = np.array([s["score"] for s in scores], dtype=float)
            out[f"reward{name}/mean"] = float(values.mean())
            if not name:
                out["reward/std"] = float(values.std())
            for key in ("accuracy", "format"):  # None where no verifier of that kind is configured
                values = [s[key] for s in scores if s.get(key) is not None]
                if values:
                    out[f"{key}{name}"] = float(np.mean(values))
        return out

    # ------------------------------------------------------------------ the run

    def checkpoint(self) -> Path:
        state = {"loader": self.loader.state_dict(), "python_rng": random.getstate(),
                 "numpy_rng": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
                 "weights_version": self.step}
        return save_checkpoint(self.out, self.step, self.learner, state, keep=self.cfg.trainer.keep_checkpoints)

    def run(self) -> Path:
        from home_rl.tracking import MetricsLogger, progress

        t = self.cfg.trainer
        logger = MetricsLogger(self.out, resume_step=self.step, tensorboard=t.tensorboard)
        bar = progress(t.total_steps, initial=self.step, desc="grpo")
        every = self.cfg.eval.every
        try:
            if self.step == 0:
                self.evaluate()  # the baseline of eval.jsonl (a resumed run has it already)
            else:
                truncate_jsonl(self.out / "eval.jsonl", self.step)  # evaluations the killed run made after it
            while self.step < t.total_steps:
                metrics = self.train_step()
                if self.step == t.total_steps or (every and self.step % every == 0):
                    metrics.update(self.evaluate())
                logger.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                len=f"{metrics.get('response_length/mean', 0):.0f}")
                if t.log_every and self.step % t.log_every == 0:
                    log.info("step %d: reward %.3f acc %.3f len %.1f step %.1fs", self.step,
                             metrics.get("reward/mean", float("nan")), metrics.get("accuracy", float("nan")),
                             metrics.get("response_length/mean", 0), metrics.get("timing/step_s", 0))
                if t.save_every and self.step % t.save_every == 0 and self.step < t.total_steps:
                    self.checkpoint()
        finally:
            bar.close()
            logger.close()
        final = Path(self.learner.save_model(str(self.out / "final")))
        from home_rl.plots import plot_metrics

        plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
        return final

    def shutdown(self) -> None:
        for group in (self.rollout, self.learner, self.rewards, self.placement):
            if group is None:
                continue
            try:
                group.shutdown()
            except Exception:  # best effort at exit: a dead actor must not hide the real error
                log.exception("shutdown of %s failed", type(group).__name__)


def on_policy(alg: GRPOConfig) -> bool:
    """One update per rollout: the learner's log-probs before it are the old policy's (the loss detaches them)."""
    return alg.ppo_epochs == 1 and alg.mini_batches == 1


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a per-step JSONL file up to `step`."""
    import json

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
