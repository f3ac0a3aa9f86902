"""GRPO's numbers against a hand computation on 2 prompts x 4 samples."""
import math

import numpy as np
import pytest
import torch

from home_rl.grpo import GRPOConfig, GRPOLoss, group_advantages
from home_rl.learner.losses import LossInputs
from home_rl.trainer.groups import ScoredGroup

REWARDS = [1, 0, 0, 1, 1, 1, 1, 0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]
LENGTHS = [2, 1, 3, 2, 1, 1, 2, 3]  # response tokens per sample (15 in all)


def test_advantages_by_hand():
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: mean 0.75, std 0.5
    s0 = math.sqrt(1 / 3)
    expected = [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0.5, 0.5, 0.5, -1.5]
    assert np.allclose(group_advantages(REWARDS, GROUPS), expected, atol=1e-5)
    # Dr.GRPO: mean-centred only
    assert np.allclose(group_advantages(REWARDS, GROUPS, norm_by_std=False),
                       [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75], atol=1e-6)
    # a group with one reward for all gets 0 advantages and is reported as zero-variance
    assert np.allclose(group_advantages([1, 1, 0, 1], [0, 0, 1, 1])[:2], 0.0)
    groups = [ScoredGroup({}, None, [], [{"score": r} for r in rewards]) for rewards in ([1, 1], [0, 1])]
    assert [g.zero_variance for g in groups] == [True, False]


def _batch(log_ratio: float, kl_offset: float):
    """Padded [8, 3] tensors: log-probs, old log-probs shifted so ratio = exp(+-log_ratio), ref log-probs."""
    adv = group_advantages(REWARDS, GROUPS)
    mask = torch.zeros(8, 3)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    g = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(8, 3, generator=g)
    signs = torch.tensor([1.0, -1.0, 1.0]).expand(8, 3)  # ratios 1.5, 1/1.5, 1.5 along each response
    old = log_probs - signs * log_ratio
    ref = log_probs + kl_offset
    advantages = torch.tensor(adv, dtype=torch.float32).unsqueeze(1).expand(8, 3)
    return log_probs, old, ref, advantages, mask


def _hand_loss(log_probs, old, ref, adv, mask, clip_low, clip_high, clip_c, kl_coef):
    total = 0.0
    tokens = mask.sum().item()
    for i in range(8):
        for t in range(3):
            if not mask[i, t]:
                continue
            r = math.exp(log_probs[i, t] - old[i, t])
            a = adv[i, t].item()
            clipped = min(max(r, 1 - clip_low), 1 + clip_high)
            loss = max(-a * r, -a * clipped)
            if a < 0:
                loss = min(loss, -a * clip_c)  # dual clip
            d = (ref[i, t] - log_probs[i, t]).item()  # low_var_kl: exp(d) - d - 1
            kl = math.exp(d) - d - 1
            total += loss + kl_coef * kl
    return total / tokens


@pytest.mark.parametrize("log_ratio", [0.0, math.log(1.5)])
def test_loss_by_hand_and_split_into_micro_batches(log_ratio):
    cfg = GRPOConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, kl_coef=0.1,
                     loss_agg_mode="token-mean")
    log_probs, old, ref, adv, mask = _batch(log_ratio, kl_offset=0.3)
    expected = _hand_loss(log_probs, old, ref, adv, mask, 0.2, 0.28, 3.0, 0.1)
    tokens = mask.sum().item()

    def share(rows):
        x = LossInputs(log_probs=log_probs[rows], entropy=torch.zeros(len(rows), 3), loss_mask=mask[rows],
                       token_data={"advantages": adv[rows], "old_log_probs": old[rows], "ref_log_probs": ref[rows]},
                       seq_data={}, global_tokens=tokens, global_sequences=8, world_size=1)
        return GRPOLoss(cfg)(x)

    whole, metrics = share(list(range(8)))
    assert whole.item() == pytest.approx(expected, abs=1e-6)
    # two micro-batches (or two ranks) give shares that add up to the same loss and metrics
    (a, ma), (b, mb) = share([0, 1, 2]), share([3, 4, 5, 6, 7])
    assert (a + b).item() == pytest.approx(expected, abs=1e-6)
    assert ma["kl"] + mb["kl"] == pytest.approx(metrics["kl"], abs=1e-6)
    assert ma["clip_frac"] + mb["clip_frac"] == pytest.approx(metrics["clip_frac"], abs=1e-6)
    if log_ratio:
        assert metrics["clip_frac"] > 0
    else:
        assert metrics["clip_frac"] == 0


def test_kl_coefficient_zero_needs_no_reference():
    log_probs, old, _, adv, mask = _batch(0.0, 0.0)
    x = LossInputs(log_probs=log_probs, entropy=None, loss_mask=mask,
                   token_data={"advantages": adv, "old_log_probs": old}, seq_data={},
                   global_tokens=mask.sum().item(), global_sequences=8, world_size=1)
    loss, metrics = GRPOLoss(GRPOConfig(kl_coef=0.0))(x)
    # ratio 1 everywhere: the loss is minus the token-mean advantage
    expected = -(adv * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6) and "kl" not in metrics


def test_on_policy_without_old_log_probs_gives_the_same_loss_and_gradient():
    """One epoch, one mini-batch: the old policy is the current one, so no recompute pass is needed."""
    log_probs, _, _, adv, mask = _batch(0.0, 0.0)
    grads = []
    for old in (log_probs.detach().clone(), None):
        lp = log_probs.detach().clone().requires_grad_(True)
        token_data = {"advantages": adv, **({"old_log_probs": old} if old is not None else {})}
        x = LossInputs(log_probs=lp, entropy=None, loss_mask=mask, token_data=token_data, seq_data={},
                       global_tokens=mask.sum().item(), global_sequences=8, world_size=1)
        loss, _ = GRPOLoss(GRPOConfig())(x)
        loss.backward()
        grads.append((loss.item(), lp.grad))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])


def test_truncated_importance_weights_scale_the_policy_loss_and_skip_an_empty_micro_batch():
    """TIS (algorithm.rollout_is=token): weights exp(old - behaviour) capped at the threshold multiply each token's
    policy loss; a filler micro-batch (all tokens masked out, a rank with fewer sequences) adds nothing."""
    log_probs, _, _, adv, mask = _batch(0.0, 0.0)
    behaviour = log_probs.detach() - torch.linspace(-1.0, 1.0, log_probs.numel()).view_as(log_probs)
    cfg = GRPOConfig(rollout_is="token", rollout_is_threshold=2.0)

    def run(m):
        x = LossInputs(log_probs=log_probs, entropy=None, loss_mask=m,
                       token_data={"advantages": adv, "rollout_log_probs": behaviour}, seq_data={},
                       global_tokens=max(m.sum().item(), 1.0), global_sequences=8, world_size=1)
        return GRPOLoss(cfg)(x)

    loss, metrics = run(mask)
    weights = torch.exp(log_probs.detach() - behaviour).clamp(max=2.0)
    expected = -(weights * adv * mask).sum() / mask.sum()  # ratio 1: minus the weighted token-mean advantage
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["is_weight_mean"] == pytest.approx(((weights * mask).sum() / mask.sum()).item(), abs=1e-6)
    raw = torch.exp(log_probs.detach() - behaviour)
    assert metrics["is_weight_max"] == pytest.approx(raw[mask > 0].max().item(), rel=1e-6)
    assert metrics["is_truncated_frac"] == pytest.approx((((raw > 2.0) * mask).sum() / mask.sum()).item(), abs=1e-6)
    empty_loss, empty = run(torch.zeros_like(mask))
    assert empty_loss.item() == 0 and empty["is_weight_max"] == 0
