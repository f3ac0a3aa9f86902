"""Losses of a learner step, normalised over the whole step so the data-parallel split cannot change them.

A loss function sees one micro-batch (`LossInputs`) and returns its *share* of the step's loss:
token sums divided by the token count of the whole step (all micro-batches, all ranks). The shares
of every micro-batch on every rank add up to the step's loss, whatever the number of learners or
the micro-batch size. The worker multiplies the share by the world size before backward, because
DeepSpeed averages gradients over ranks.

A stage passes its loss to `LearnerGroup.train_step` by name (from `LOSSES`), or as a picklable
function or `LossSpec` (GRPO's `home_rl.grpo.GRPOLoss` builds on verl's `core_algos`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class LossInputs:
    log_probs: torch.Tensor  # [B, K] log-probs of the target tokens (with grad)
    entropy: Optional[torch.Tensor]  # [B, K] token entropies, when the loss asked for them
    loss_mask: torch.Tensor  # [B, K] float: which positions count
    token_data: dict  # name -> [B, K] (advantages, old_log_probs, ref_log_probs, ...)
    seq_data: dict  # name -> [B]
    global_tokens: float  # loss tokens in the whole step (every rank)
    global_sequences: int  # sequences in the whole step (every rank)
    world_size: int


LossFn = Callable[[LossInputs], tuple[torch.Tensor, dict]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_entropy: bool = False  # the loss reads token entropies
    entropy_grad: bool = True  # ... and differentiates them (False: a metric, computed without a graph)


def sft_loss(x: LossInputs) -> tuple[torch.Tensor, dict]:
    """Token-level negative log-likelihood of the response, averaged over the step's response tokens."""
    nll = -(x.log_probs * x.loss_mask).sum() / max(x.global_tokens, 1.0)
    return nll, {"token_loss": nll.item()}


LOSSES: dict[str, LossSpec] = {"sft": LossSpec(sft_loss)}


def resolve_loss(loss: str | LossFn | LossSpec) -> LossSpec:
    if isinstance(loss, LossSpec):
        return loss
    if callable(loss):
        return LossSpec(loss, getattr(loss, "needs_entropy", False), getattr(loss, "entropy_grad", True))
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    return LOSSES[loss]


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                    temperature: float = 1.0, entropy_grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of `targets` under `logits` [B, K, V] (in fp32), and optionally the token entropies.

    An entropy that is only a metric (`entropy_grad=False`) keeps no graph: its softmax-sized
    intermediates would otherwise stay alive until backward.
    """
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = logprobs_from_logits(logits, targets)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    return log_probs, entropy


def router_ce(router_logits: torch.Tensor, labels: torch.Tensor, global_labelled: int) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the router on expert labels (-1: unlabelled), averaged over the step's labelled rows."""
    rows = labels >= 0
    if not rows.any():
        return router_logits.sum() * 0.0, {"router_loss": 0.0, "router_correct": 0.0}
    ce = F.cross_entropy(router_logits[rows].float(), labels[rows], reduction="sum") / max(global_labelled, 1)
    correct = (router_logits[rows].argmax(-1) == labels[rows]).sum().item()
    return ce, {"router_loss": ce.item(), "router_correct": float(correct)}
