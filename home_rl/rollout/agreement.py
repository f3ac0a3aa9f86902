"""How far the rollout engine's log-probs and the learner's disagree on the same sampled tokens.

GRPO's importance ratio is exp(learner log-prob - engine log-prob) per token: for the weights that
sampled, at the sampling temperature, it should be 1. A drift between the two (a dtype, a kernel, a
stale weight, a temperature the learner did not apply) biases every update silently, so each GRPO
step logs it, as verl and its peers do:

    rollout/logprob_diff_mean   mean |learner - engine| over the step's response tokens
    rollout/logprob_diff_max    the largest such difference
    rollout/logprob_pearson     Pearson correlation of the two

The learners compute additive shares (`agreement_sums`, per micro-batch and rank), the driver adds
them up and turns them into the three metrics (`agreement_metrics`); `logprob_agreement` does both
at once for checks on whole lists of samples.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from home_rl.rollout.types import Sample

PREFIX = "agree/"  # the shares' metric names: summed over micro-batches and ranks (`*_max`: a maximum)
_SUMS = ("n", "x", "y", "xx", "yy", "xy", "abs")


def agreement_sums(learner: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Additive shares over the masked tokens: count, sums, squares and cross products (in float64), the sum of
    absolute differences, and their maximum (`agree/diff_max`)."""
    kept = mask > 0
    x, y = learner.detach().double()[kept], engine.detach().double().to(learner.device)[kept]
    values = {"n": x.numel(), "x": x.sum(), "y": y.sum(), "xx": (x * x).sum(), "yy": (y * y).sum(),
              "xy": (x * y).sum(), "abs": (x - y).abs().sum()}
    out = {PREFIX + k: float(v) for k, v in values.items()}
    out[PREFIX + "diff_max"] = float((x - y).abs().max()) if x.numel() else 0.0
    return out


def agreement_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """The step's rollout/logprob_* metrics from summed shares (empty when no token was compared)."""
    n = sums.get(PREFIX + "n", 0.0)
    if not n:
        return {}
    x, y, xx, yy, xy = (sums[PREFIX + k] for k in _SUMS[1:6])
    cov = xy - x * y / n
    var_x, var_y = xx - x * x / n, yy - y * y / n
    # two constant sequences (every token certain) agree perfectly when equal
    pearson = cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else float(sums[PREFIX + "abs"] == 0)
    return {"rollout/logprob_diff_mean": sums[PREFIX + "abs"] / n,
            "rollout/logprob_diff_max": sums[PREFIX + "diff_max"],
            "rollout/logprob_pearson": pearson}


def logprob_agreement(samples: Sequence[Sample], reference: Sequence[torch.Tensor]) -> dict[str, float]:
    """The three metrics between the samples' engine log-probs and `reference` (one tensor per sample), plus
    the number of tokens compared."""
    if len(samples) != len(reference):
        raise ValueError(f"{len(samples)} samples but {len(reference)} reference rows")
    totals: dict[str, float] = {}
    for s, ref in zip(samples, reference):
        if len(s.logprobs) != len(ref):
            raise ValueError(f"sample {s.prompt_index}/{s.sample_index}: {len(s.logprobs)} log-probs, "
                             f"reference has {len(ref)}")
        engine = torch.tensor(s.logprobs, dtype=torch.float64)
        for key, value in agreement_sums(ref, engine, torch.ones_like(engine)).items():
            totals[key] = max(totals.get(key, 0.0), value) if key.endswith("_max") else totals.get(key, 0.0) + value
    return {**agreement_metrics(totals), "tokens": int(totals.get(PREFIX + "n", 0))}


@torch.no_grad()
def recompute_logprobs(model: torch.nn.Module, samples: Sequence[Sample], batch_size: int = 16,
                       pad_token_id: int = 0, temperature: float = 1.0) -> list[torch.Tensor]:
    """Log-probs (float32) of each sample's response tokens under a transformers causal LM (text prompts), of
    its logits divided by `temperature`: a check independent of the learners."""
    out: list[torch.Tensor] = []
    device = next(model.parameters()).device
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):  # right padding: positions of the real tokens start at 0
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float() / temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, s in enumerate(chunk):
            p, r = len(s.prompt_ids), len(s.response_ids)
            positions = torch.arange(p - 1, p + r - 1)  # logits at t predict token t + 1
            targets = torch.tensor(s.response_ids)
            out.append(logprobs[row, positions.to(device), targets.to(device)].cpu())
    return out
