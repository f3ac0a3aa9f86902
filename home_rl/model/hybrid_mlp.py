"""HybridMLP: a decoder layer's MLP split into named experts, chosen per sequence.

Routing in HOME is a hard choice per query, so a forward pass carries one expert name per
sequence (or one name for the whole batch). Each expert runs only on the rows routed to it.
"""
from __future__ import annotations

import copy
from typing import Union

import torch
from torch import nn

from home_rl.experts import FAST, THINK

# A route: one expert name for every row, or a LongTensor [batch] of indices into HybridMLP.names.
Route = Union[str, torch.Tensor]


class HybridMLP(nn.Module):
    def __init__(self, dense_mlp: nn.Module):
        super().__init__()
        # Both experts start as exact copies of the dense MLP (upcycling).
        self.experts = nn.ModuleDict({FAST: dense_mlp, THINK: copy.deepcopy(dense_mlp)})
        self.route: Route = THINK
        # Under ZeRO-3 every rank must enter the same modules (entering one gathers its weights
        # collectively), so the learner sets this: experts with no rows still run on 0 rows.
        self.call_every_expert = False

    @property
    def names(self) -> list[str]:
        return list(self.experts.keys())

    def add_expert(self, name: str, copy_of: str) -> None:
        """Add a frozen copy of an expert (e.g. the reference think expert for the KL term)."""
        clone = copy.deepcopy(self.experts[copy_of])
        clone.requires_grad_(False)
        self.experts[name] = clone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if isinstance(route, str):
            if self.call_every_expert:
                for name, expert in self.experts.items():
                    if name != route:  # enter the others on an empty batch (ZeRO-3 gathers stay in step)
                        x = x + 0 * expert(x[:0]).sum()
            return self.experts[route](x)
        if route.shape[0] != x.shape[0]:
            raise ValueError(f"route has {route.shape[0]} entries for a batch of {x.shape[0]} sequences")
        out = x.new_zeros(x.shape)
        for idx, (name, expert) in enumerate(self.experts.items()):
            rows = (route == idx).nonzero().squeeze(1)
            if rows.numel() or self.call_every_expert:
                out = out.index_copy(0, rows, expert(x.index_select(0, rows)).to(out.dtype))
        return out
