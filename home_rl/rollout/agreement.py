"""Log-prob agreement between the rollout engine and the learner.

GRPO's importance ratio is exp(learner log-prob - rollout log-prob) per token: with the same
weights it should be 1. This measures how far from it the two engines are on the same tokens.

    reference = recompute_logprobs(hf_model, samples)      # learner side, transformers forward
    stats = logprob_agreement(samples, reference)          # {"max_abs_diff", "mean_abs_diff", "tokens"}

With rollout.logprobs_mode=raw_logprobs vLLM returns the log-probs of the unmodified distribution
(temperature 1, no top-k/top-p): the learner's forward at temperature 1 is the matching side.
"""
from __future__ import annotations

from typing import Sequence

import torch

from home_rl.rollout.types import Sample


@torch.no_grad()
def recompute_logprobs(model: torch.nn.Module, samples: Sequence[Sample], batch_size: int = 16,
                       pad_token_id: int = 0) -> list[torch.Tensor]:
    """Log-probs (float32) of each sample's response tokens under a transformers causal LM (text prompts)."""
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
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, s in enumerate(chunk):
            p, r = len(s.prompt_ids), len(s.response_ids)
            positions = torch.arange(p - 1, p + r - 1)  # logits at t predict token t + 1
            targets = torch.tensor(s.response_ids)
            out.append(logprobs[row, positions.to(device), targets.to(device)].cpu())
    return out


def logprob_agreement(samples: Sequence[Sample], reference: Sequence[torch.Tensor]) -> dict:
    """Max and mean absolute difference between the samples' log-probs and `reference`, over all tokens."""
    if len(samples) != len(reference):
        raise ValueError(f"{len(samples)} samples but {len(reference)} reference rows")
    diffs = []
    for s, ref in zip(samples, reference):
        if len(s.logprobs) != len(ref):
            raise ValueError(f"sample {s.prompt_index}/{s.sample_index}: {len(s.logprobs)} log-probs, reference has {len(ref)}")
        diffs.append((torch.tensor(s.logprobs, dtype=torch.float64) - ref.double()).abs())
    flat = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    return {"max_abs_diff": float(flat.max()) if flat.numel() else 0.0,
            "mean_abs_diff": float(flat.mean()) if flat.numel() else 0.0,
            "tokens": int(flat.numel())}
