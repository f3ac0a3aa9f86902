"""A micro-batch through the model: logits, then log-probs (and entropies) of its response tokens.

Plain micro-batches (one sequence a row) go straight to the model and to verl's log-prob function.
Shared-prefix micro-batches (`collate_shared`: a prompt and its responses in one row) need three
things a plain forward pass does not: their 4D attention mask in the form the model's attention
implementation reads, position ids that continue from the prompt in every response (for
Qwen2.5-VL the prompt's 3D rope positions, the responses' text positions shifted by the prompt's
rope delta), and log-probs gathered per sequence, because the prompt's last position predicts the
first token of every response.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from home_rl.learner.batch import MicroBatch
from home_rl.learner.losses import token_log_probs
from home_rl.model.architectures import text_config

# Attention implementations that take an arbitrary 4D mask (flash-attention kernels take none).
MASKED_ATTENTION = ("sdpa", "eager")


def model_inputs(module: nn.Module, mb: MicroBatch, is_home: bool) -> dict[str, Any]:
    """The keyword arguments of `module`'s forward pass for `mb`; a HOME model runs each row on its route."""
    inputs = mb.model_inputs()
    if is_home:
        if mb.routes is not None and any(r is None for r in mb.routes):
            raise ValueError("every sequence of a HOME model's batch needs a route, or none does")
        inputs["route"] = mb.routes if mb.routes is not None else "think"
    if mb.seq_rows is None:
        return inputs
    base = module.base if is_home else module
    inputs["attention_mask"] = _mask_for(base.config, mb.attention_mask, base.dtype)
    rope = getattr(getattr(base, "model", None), "get_rope_index", None)
    if rope is not None and "image_grid_thw" in mb.mm_inputs:
        inputs["position_ids"] = _rope_positions(rope, mb)
    return inputs


def log_probs(call: Callable[..., Any], module: nn.Module, mb: MicroBatch, is_home: bool, with_entropy: bool,
              temperature: float = 1.0, entropy_grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs [S, K] of each sequence's response tokens under `call` (the model, or its DeepSpeed
    engine), and their entropies; laid out as `mb.targets`."""
    logits = call(**model_inputs(module, mb, is_home)).logits
    if mb.seq_rows is None:
        return token_log_probs(logits, mb.targets, with_entropy, temperature, entropy_grad)
    return gathered_log_probs(logits, mb.seq_rows, mb.seq_positions, mb.targets, with_entropy, temperature,
                              entropy_grad)


def sequence_logits(logits: torch.Tensor, mb: MicroBatch) -> list[torch.Tensor]:
    """Per sequence: the logits [response tokens, vocab] that predict its response."""
    out = []
    for s, n in enumerate(mb.response_lengths):
        if mb.seq_rows is None:
            out.append(logits[s, mb.response_mask[s].nonzero().squeeze(1)])
        else:
            out.append(logits[mb.seq_rows[s], mb.seq_positions[s, :n]])
    return out


def gathered_log_probs(logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                       with_entropy: bool, temperature: float = 1.0,
                       entropy_grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """token_log_probs for packed rows: sequence s's token k is predicted by logits[rows[s], positions[s, k]].

    log p = logit of the target - logsumexp, in fp32 (verl's formula); the logsumexp (and entropy) is
    taken once per packed position, then gathered, so a prompt position shared by n responses is not
    copied n times.
    """
    from verl.utils.torch_functional import entropy_from_logits

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    rows = rows.to(logits.device)[:, None].expand_as(positions)
    positions = positions.to(logits.device)
    picked = logits[rows, positions, targets.to(logits.device)]
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # row by row: a smaller peak
    log_probs = picked - lse[rows, positions]
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)[rows, positions]
    return log_probs, entropy


def _mask_for(config: Any, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean 4D mask as the attention implementation reads it: sdpa a boolean, eager an additive float."""
    impl = getattr(text_config(config), "_attn_implementation", None) or "sdpa"
    if impl not in MASKED_ATTENTION:
        raise ValueError(f"learner.shared_prefix needs an attention implementation that takes a 4D mask "
                         f"({' or '.join(MASKED_ATTENTION)}); this model uses {impl!r}: set learner.shared_prefix=false")
    if impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _rope_positions(get_rope_index: Callable, mb: MicroBatch) -> torch.Tensor:
    """Qwen2.5-VL's 3D positions [3, B, T] of shared rows: the prompt's from the model's own rope index, each
    response's its text positions plus the prompt's rope delta (what the unshared sequence gets)."""
    types = mb.mm_inputs["mm_token_type_ids"]
    lengths = mb.prompt_lengths.to(mb.input_ids.device)
    width = int(lengths.max())
    prompt_mask = (torch.arange(width, device=lengths.device)[None] < lengths[:, None]).long()
    prompt_positions, deltas = get_rope_index(mb.input_ids[:, :width], mm_token_type_ids=types[:, :width],
                                              image_grid_thw=mb.mm_inputs["image_grid_thw"],
                                              attention_mask=prompt_mask)
    positions = (mb.position_ids + deltas.to(mb.position_ids.device).view(-1, 1))[None].repeat(3, 1, 1)
    in_prompt = prompt_mask.bool()[None].expand(3, -1, -1)
    positions[:, :, :width][in_prompt] = prompt_positions.to(positions.device)[in_prompt]
    return positions
