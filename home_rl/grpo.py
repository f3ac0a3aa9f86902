"""GRPO's math, from verl's `core_algos`: group-normalised advantages, the clipped policy loss, the
KL penalty to the reference policy, and their aggregation.

The learner calls `GRPOLoss` on one micro-batch at a time and expects the micro-batch's *share* of
the step's loss (normalised by the token / sequence counts of the whole step, on every rank), so
verl's `agg_loss` is called with dp_size=1 and the global counts. Metrics are returned as shares
too, so that summing them over micro-batches and ranks gives step-level means.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import numpy as np
import torch

from home_rl.errors import ConfigError
from home_rl.rollout.agreement import agreement_sums

POLICY_LOSSES = ("vanilla", "gspo", "clip_cov", "kl_cov", "geo_mean", "gpg", "cispo", "sapo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("low_var_kl", "k1", "k2", "k3", "abs", "mse")
ROLLOUT_IS = ("auto", "token", "sequence", "none")


@dataclasses.dataclass
class GRPOConfig:
    norm_adv_by_std: bool = True  # divide by the group's reward std (GRPO); false gives Dr.GRPO's mean-only advantages
    policy_loss: str = "vanilla"  # verl policy loss: vanilla (clipped PPO ratio), gspo (sequence-level ratio), ...
    clip_ratio_low: float = 0.2  # ratio clipped below at 1 - clip_ratio_low
    clip_ratio_high: float = 0.28  # ratio clipped above at 1 + clip_ratio_high (DAPO's clip-higher)
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages (must be > 1)
    loss_agg_mode: str = "token-mean"  # how token losses become one number: token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.0  # weight of the KL penalty to the reference think expert (verl's use_kl_loss; e.g. 0.001); 0 skips reference log-probs
    kl_estimator: str = "low_var_kl"  # verl KL estimator: low_var_kl | k1 | k2 | k3 | abs | mse
    entropy_coef: float = 0.0  # entropy bonus weight (entropy is always logged)
    ppo_epochs: int = 1  # passes over each step's rollouts
    mini_batches: int = 1  # optimizer steps per pass (the step's sequences split into this many mini-batches)
    recompute_old_log_probs: bool = True  # old log-probs from the learner (exact; with 1 epoch and 1 mini-batch no pass is needed: old = current, detached); false uses the rollout engine's
    filter_zero_variance: bool = False  # DAPO-style: drop prompt groups whose rewards are all equal, regenerate to refill
    max_regenerations: int = 2  # extra rollout rounds per step to refill the batch after filtering
    rollout_is: str = "auto"  # importance weight old policy / behaviour (the rollout engine's log-probs), verl's TIS: token | sequence | none | auto (token when trainer.max_staleness > 0, else none)
    rollout_is_threshold: float = 2.0  # truncation of that weight (TIS: weights above it count as it)

    CHOICES: ClassVar[dict] = {"policy_loss": POLICY_LOSSES, "loss_agg_mode": LOSS_AGG_MODES,
                               "kl_estimator": KL_ESTIMATORS, "rollout_is": ROLLOUT_IS}

    def __post_init__(self):
        if self.rollout_is_threshold <= 0:
            raise ConfigError(f"algorithm.rollout_is_threshold must be > 0, got {self.rollout_is_threshold}")


def group_advantages(rewards: Sequence[float], group_ids: Sequence[int], norm_by_std: bool = True,
                     epsilon: float = 1e-6) -> np.ndarray:
    """One advantage per sample: its reward normalised within its prompt's group (verl's GRPO estimator)."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    scores = torch.tensor(np.asarray(rewards, dtype=np.float32)).unsqueeze(1)  # the reward sits on one token
    mask = torch.ones_like(scores)
    adv, _ = compute_grpo_outcome_advantage(scores, mask, np.asarray(group_ids), epsilon=epsilon,
                                            norm_adv_by_std_in_grpo=norm_by_std)
    return adv[:, 0].numpy()


@dataclasses.dataclass
class GRPOLoss:
    """The learner's loss for one micro-batch: policy loss + kl_coef * KL - entropy_coef * entropy."""

    cfg: GRPOConfig
    needs_entropy: bool = True  # entropy is a metric even when its coefficient is 0

    @property
    def entropy_grad(self) -> bool:  # only an entropy bonus differentiates it
        return self.cfg.entropy_coef != 0

    def __call__(self, x) -> tuple[torch.Tensor, dict]:
        from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
        from verl.workers.config import ActorConfig

        cfg = self.cfg
        mask = x.loss_mask
        counts = {"dp_size": 1, "batch_num_tokens": x.global_tokens, "global_batch_size": x.global_sequences}
        # verl's policy losses read their knobs from its ActorConfig (gspo insists on the type)
        policy_config = ActorConfig(
            strategy="deepspeed", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss={"loss_mode": cfg.policy_loss},
            clip_ratio=cfg.clip_ratio_low, clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
            clip_ratio_c=cfg.clip_ratio_c, loss_agg_mode=cfg.loss_agg_mode, global_batch_info=counts)
        advantages = x.token_data["advantages"].to(x.log_probs.dtype)
        # On-policy (one epoch, one mini-batch) the old policy is the current one: no extra forward pass.
        old = x.token_data["old_log_probs"].to(x.log_probs.dtype) if "old_log_probs" in x.token_data \
            else x.log_probs.detach()

        def mean_share(values: torch.Tensor) -> float:  # this micro-batch's part of the step's token mean
            return float((values * mask).sum() / max(x.global_tokens, 1.0))

        is_weights, is_metrics = None, {}
        if cfg.rollout_is in ("token", "sequence"):
            is_weights, is_metrics = self.rollout_correction(old, x.token_data["rollout_log_probs"], mask, mean_share)
        pg_loss, pg_metrics = get_policy_loss_fn(cfg.policy_loss)(
            old_log_prob=old, log_prob=x.log_probs, advantages=advantages, response_mask=mask,
            loss_agg_mode=cfg.loss_agg_mode, config=policy_config, rollout_is_weights=is_weights)
        loss = pg_loss

        # verl's clip fractions are micro-batch means: weight them by the micro-batch's token share
        weight = float(mask.sum()) / max(x.global_tokens, 1.0)
        metrics = {"pg_loss": float(pg_loss.detach()),
                   "clip_frac": pg_metrics.get("actor/pg_clipfrac", 0.0) * weight,
                   "ppo_kl": pg_metrics.get("actor/ppo_kl", 0.0) * weight, **is_metrics}
        if "rollout_log_probs" in x.token_data:  # the driver reads them off the step's first update call
            metrics.update(agreement_sums(x.log_probs, x.token_data["rollout_log_probs"], mask))
        if cfg.kl_coef > 0:
            kl = kl_penalty(x.log_probs, x.token_data["ref_log_probs"].to(x.log_probs.dtype), cfg.kl_estimator)
            kl_loss = agg_loss(kl, mask, cfg.loss_agg_mode, **counts)
            loss = loss + cfg.kl_coef * kl_loss
            metrics["kl"] = mean_share(kl.detach())
        if x.entropy is not None:
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * agg_loss(x.entropy, mask, cfg.loss_agg_mode, **counts)
            metrics["entropy"] = mean_share(x.entropy.detach())
        return loss, metrics

    def rollout_correction(self, old: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor,
                           mean_share) -> tuple[torch.Tensor, dict]:
        """verl's truncated importance weights old policy / behaviour policy (the engine that sampled), and
        their step-level metrics: mean and truncated share as token-mean shares, max as a max."""
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

        if not (mask > 0).any():  # a rank's filler micro-batch: nothing in the loss (verl refuses an empty mask)
            return torch.zeros_like(old), {"is_weight_mean": 0.0, "is_truncated_frac": 0.0, "is_weight_max": 0.0}
        log_ratio = (old - behaviour.to(old.dtype)).detach()
        weights, _ = compute_rollout_correction_weights(log_ratio, mask, rollout_is=self.cfg.rollout_is,
                                                        rollout_is_threshold=self.cfg.rollout_is_threshold)
        raw = torch.exp(log_ratio.clamp(-20, 20)) if self.cfg.rollout_is == "token" else \
            torch.exp((log_ratio * mask).sum(-1, keepdim=True).clamp(-20, 20)).expand_as(log_ratio)
        kept = mask > 0
        return weights, {"is_weight_mean": mean_share(weights), "is_truncated_frac": mean_share(
            (raw > self.cfg.rollout_is_threshold).float()),
            "is_weight_max": float(raw[kept].max()) if kept.any() else 0.0}  # before truncation
