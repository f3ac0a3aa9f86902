"""The router: a small MLP over pooled prompt hidden states, returning logits for [fast, think]."""
from __future__ import annotations

import torch
from torch import nn

from home_rl.experts import EXPERTS


class Router(nn.Module):
    def __init__(self, hidden_size: int, router_hidden: int = 256):
        super().__init__()
        # LayerNorm first: pooled hidden states of a middle layer vary in scale from model to model.
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, router_hidden),
            nn.GELU(),
            nn.Linear(router_hidden, len(EXPERTS)),
        )
        nn.init.zeros_(self.net[-1].weight)  # an untrained router is undecided: equal logits
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.to(self.net[1].weight.dtype))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool [batch, seq, hidden] over the positions where attention_mask is 1: 'mean' or 'last'."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if how == "last":  # the last attended position works for left and right padding alike
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.bool() * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}: expected 'mean' or 'last'")
