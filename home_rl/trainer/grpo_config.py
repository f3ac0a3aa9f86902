"""The main job's config: every section with the embedded default's values, and the settings derived from them.

Derived settings are filled in by `resolve()`, which `load_config` calls as it loads the config, so
that `config.yaml` and `--help` show what runs: the trainable set of `train_shared`, the engines'
sleep of colocated placement, the KL reference copy, the data seed, the paths of the synthetic
training and held-out data (written under output_dir when the run starts), and the two files of a
data folder with train/test splits (verl's train.parquet + test.parquet: train trains, test evaluates),
and the lengths the user did not set, fitted to the model's context (home_rl/context_length.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from data_pipelines import DataConfig, find_splits
from home_rl.cluster import ClusterConfig
from home_rl.config import ModelConfig
from home_rl.context_length import fit_rollout_lengths
from home_rl.errors import ConfigError
from home_rl.experts import REFERENCE, THINK
from home_rl.grpo import GRPOConfig
from home_rl.learner.config import LearnerConfig
from home_rl.memory_plan.run import Run
from home_rl.rollout.config import RolloutConfig
from home_rl.trainer.config import GRPOTrainerConfig
from home_rl.trainer.rollout_ahead import staged_versions
from reward import RewardConfig


# The embedded default is sized for 2 CPU cores and 24 GB: a learner's micro-batch of 8 sequences of
# 192 tokens peaks at 5.9 GB (16: 9.2 GB, and no faster). What its run measures, and why lr is 3e-5:
# the README's main job section.


def _data_defaults() -> DataConfig:
    # Every step gets the same mix of step counts: with 8 prompts of random levels, the share of hard
    # ones moved a step's mean reward by +-0.1 (measured), as much as 20 steps of learning.
    # 16 prompts of 4 samples instead of 8 of 8: the same compute, and a step's mean reward varies
    # with which prompts it drew far more than with the samples of one prompt (most groups agree). In float32
    # at temperature 1.3, 8 of 8 with no second round (steps of 40 s) raised held-out accuracy 8 points in 20 steps
    # where 16 of 4 with a second round (68 s) raised it 30: the update learns from distinct prompts (README).
    # The memory plan sizes the learners' micro-batches by data.max_prompt_tokens (home_rl/memory_plan/): the
    # synthetic prompts of levels 1-4 are at most 106 tokens with smollm2's tokenizer and 176 with the tiny test
    # models' (measured), while 1024 would plan 8 x 1184-token sequences per micro-batch, about 13 GiB of
    # activations per learner that these prompts never use: 2 learners would not fit 24 GiB.
    return DataConfig(prompts_per_step=16, stratify_by="extra_info.steps", max_prompt_tokens=192)


def _rollout_defaults() -> RolloutConfig:
    # the worked trace of a six-step problem is about 120 tokens; n=4: see _data_defaults. Temperature 1.3:
    # the cold start samples with little entropy at 1.0, and most groups then score alike; at 1.5 a quarter of the
    # samples lose the template (README, main job)
    return RolloutConfig(n=4, max_response_tokens=160, temperature=1.3)


LORA_LR_FACTOR = 10  # model.think_expert=lora without a learner.lr given: 10x the full expert's default


def _learner_defaults() -> LearnerConfig:
    return LearnerConfig(num_learners=2, trainable=THINK, lr=3e-5, micro_batch_size=8)


def _algorithm_defaults() -> GRPOConfig:
    # Most groups of 4 samples score all alike at this size (38-81% a step, measured): drop them and sample
    # one more round, so each update spends its compute on groups that carry a signal (DAPO).
    return GRPOConfig(filter_zero_variance=True, max_regenerations=1)


def _reward_defaults() -> RewardConfig:
    return RewardConfig(num_workers=1)  # math-verify scores a step's 128 samples in ~0.2 s: one worker is plenty


def _trainer_defaults() -> GRPOTrainerConfig:
    return GRPOTrainerConfig(total_steps=20, save_every=5)


def check_sampling_matches_learner(rollout: RolloutConfig) -> None:
    """GRPO trains the policy that samples: the learners divide the logits by rollout.temperature in every pass,
    and the engine's log-probs (old or behaviour policy, and the agreement metrics) must be of that same
    distribution. A truncated distribution (top-p, top-k) is one no learner pass computes: refused, not biased."""
    if rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature={rollout.temperature}: GRPO needs sampling (greedy samples of a group "
                          "are all alike and carry no signal); use a temperature above 0, e.g. 1.0")
    if rollout.top_p < 1.0 or rollout.top_k != -1:
        key = "rollout.top_p" if rollout.top_p < 1.0 else "rollout.top_k"
        raise ConfigError(f"{key}={getattr(rollout, key.split('.')[1])}: the learners' log-probs cannot match a "
                          "top-p/top-k truncated distribution, so GRPO would train another policy than the one that "
                          "sampled; set rollout.top_p=1.0 and rollout.top_k=-1 (lower rollout.temperature instead)")
    if rollout.logprobs_mode != "processed_logprobs" and rollout.temperature != 1.0:
        raise ConfigError(f"rollout.logprobs_mode={rollout.logprobs_mode} gives log-probs at temperature 1, but the "
                          f"rollout samples at rollout.temperature={rollout.temperature}: use processed_logprobs")


@dataclasses.dataclass
class EvalConfig:
    path: str = ""  # held-out prompts (any data format); "": the test split of a data.path folder with train/test splits, with synthetic training data `rows` new synthetic problems (output_dir/eval_data), else no evaluation
    rows: int = 200  # held-out prompts scored by the think view before the first step and after the last (0: no evaluation)
    every: int = 0  # also evaluate every N steps (0: only before and after)
    n: int = 1  # samples per prompt (rollout's sampling settings, a fixed seed)


@dataclasses.dataclass
class GRPOThinkConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the HOME checkpoint to train (smollm2: the embedded default, built by its cold start when absent)
    data: DataConfig = dataclasses.field(default_factory=_data_defaults)  # prompts (data.path empty: synthetic multi-step math made for this run, output_dir/data)
    rollout: RolloutConfig = dataclasses.field(default_factory=_rollout_defaults)  # vLLM workers serving the think view
    reward: RewardConfig = dataclasses.field(default_factory=_reward_defaults)  # verifiers per data_source and their worker pool
    learner: LearnerConfig = dataclasses.field(default_factory=_learner_defaults)  # DeepSpeed ZeRO-3 learners
    algorithm: GRPOConfig = dataclasses.field(default_factory=_algorithm_defaults)  # advantages, policy loss, KL, PPO epochs
    trainer: GRPOTrainerConfig = dataclasses.field(default_factory=_trainer_defaults)  # steps, checkpoints, resume, logging, asynchronous rollouts (max_staleness)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)  # disaggregated or colocated placement, resource wait
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # held-out accuracy of the think view: eval.jsonl, eval/* metrics
    train_shared: bool = False  # also train shared weights (attention, embeddings, ...): the fast expert then drifts
    synthetic_rows: int = 2000  # rows of synthetic math made when data.path is empty
    synthetic_levels: str = "1-4"  # math steps of the synthetic rows (1-6 exist; 5-6 are rarely solved by the embedded default)
    seed: int = 0  # seeds data order, sampling and every actor
    output_dir: str = "outputs/grpo_think"  # config.yaml, metrics.jsonl, checkpoints/, final/, plots/

    def resolve(self, given: frozenset[str] = frozenset()) -> "GRPOThinkConfig":
        """Fill in the settings derived from others (idempotent: a saved config.yaml resolves to itself);
        `given`: the keys the user set (home_rl.config.resolved)."""
        if self.model.think_expert == "lora" and "learner.lr" not in given and self.learner.lr == _learner_defaults().lr:
            # LoRA's best learning rate is about 10x full fine-tuning's (Schulman et al. 2025, "LoRA Without Regret")
            self.learner.lr = LORA_LR_FACTOR * self.learner.lr
        if self.train_shared and self.learner.trainable == THINK:
            self.learner.trainable = "think,shared"  # the shared weights are in the think view: they sync too
        if self.cluster.mode == "colocated":
            self.rollout.sleep_during_updates = True  # the learner sharing the GPU gets the engine's memory
        self.rollout.weight_transfer = self.rollout.transfer_backend  # auto decided, so config.yaml says which
        self.rollout.lora_engine = "adapter" if self.rollout.serves_adapter else "merged"
        if self.algorithm.kl_coef > 0 and not any(c.startswith(REFERENCE + "=") for c in self.learner.frozen_copies):
            self.learner.frozen_copies = [*self.learner.frozen_copies, f"{REFERENCE}={THINK}"]
        if self.trainer.max_staleness > 0 and self.cluster.mode == "colocated":
            raise ConfigError("trainer.max_staleness > 0 overlaps rollout with the update; cluster.mode=colocated "
                              "puts both on the same GPUs, whose engines sleep during updates: use disaggregated")
        check_sampling_matches_learner(self.rollout)
        if self.algorithm.rollout_is == "auto":  # rollouts of older weights are corrected towards the old policy
            self.algorithm.rollout_is = "token" if self.trainer.max_staleness > 0 else "none"
        if self.algorithm.rollout_is != "none" and not self.algorithm.recompute_old_log_probs:
            raise ConfigError(f"algorithm.rollout_is={self.algorithm.rollout_is} weighs the old policy against the "
                              "rollout engine's: it needs algorithm.recompute_old_log_probs=true (false makes them one)")
        self.data.seed = self.seed
        splits = find_splits(self.data.path) if self.data.path else None
        if splits is not None:  # a verl data folder: its test split is held out, not trained on
            self.data.path = str(splits.train)
            if self.eval.rows and not self.eval.path:
                self.eval.path = str(splits.heldout)
        if not self.data.path:
            self.data.path = str(self.synthetic_data_path())
            if self.eval.rows and not self.eval.path:
                self.eval.path = str(self.heldout_data_path())
        fit_rollout_lengths(self, self.model.path, given)
        return self

    def synthetic_data_path(self) -> Path:
        """Where the synthetic training rows of this run live (made at start-up when missing)."""
        return Path(self.output_dir) / "data" / "data.jsonl"

    def heldout_data_path(self) -> Path:
        """Where the synthetic held-out rows of this run live (made at start-up when missing)."""
        return Path(self.output_dir) / "eval_data" / "data.jsonl"

    def memory_run(self) -> Run:
        """What this job runs, for the memory plan: learners, rollout workers serving the think view, reward
        workers, the think view's export from the HOME checkpoint (an embedded model's cold start), and the weight
        versions learner rank 0 keeps for the engines (theirs, and the ones made ahead of them)."""
        return Run(model_path=self.model.path, embedded_home=True, learner=self.learner, rollout=self.rollout,
                   reward_workers=self.reward.num_workers, dtype=self.model.dtype,
                   prompt_tokens=self.data.max_prompt_tokens, response_tokens=self.rollout.max_response_tokens,
                   exports_view=True, staged_versions=staged_versions(self.trainer.max_staleness), mode=self.cluster.mode,
                   on_long_prompt=self.rollout.on_long_prompt)
