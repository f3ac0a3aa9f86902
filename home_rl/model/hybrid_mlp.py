"""HybridMLP: a decoder layer's MLP split into named experts, chosen per sequence.

Routing in HOME is a hard choice per query, so a forward pass carries one expert name per
sequence (or one name for the whole batch). Each expert runs only on the rows routed to it.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from home_rl.experts import FAST, THINK

# A route: one expert name for every row, or a LongTensor [batch] of indices into HybridMLP.names.
Route = Union[str, torch.Tensor]


class HybridMLP(nn.Module):
    def __init__(self, experts: Mapping[str, nn.Module]):
        super().__init__()
        self.experts = nn.ModuleDict(dict(experts))
        self.route: Route = THINK
        # Under ZeRO-3 every rank must enter the same modules (entering one gathers its weights
        # collectively), so the learner sets this: experts with no rows still run on 0 rows.
        self.call_every_expert = False

    @classmethod
    def upcycled(cls, dense_mlp: nn.Module) -> "HybridMLP":
        """Both experts start as exact copies of the dense MLP (upcycling)."""
        return cls({FAST: dense_mlp, THINK: copy.deepcopy(dense_mlp)})

    @classmethod
    def shaped_like(cls, mlp: nn.Module, names: Sequence[str]) -> "HybridMLP":
        """Experts `names` for weights loaded afterwards: `mlp` itself is the first, the others are new
        modules of its class. New modules, not copies: under deepspeed.zero.Init each is partitioned as
        it is built, whereas a deep copy of a partitioned module is no ZeRO module (its parameters are
        empty placeholders that claim the original's ZeRO identity)."""
        if not hasattr(mlp, "config"):
            raise TypeError(f"{type(mlp).__name__} keeps no config to build more experts of its shape from")
        return cls({name: mlp if i == 0 else type(mlp)(mlp.config) for i, name in enumerate(names)})

    @property
    def names(self) -> list[str]:
        return list(self.experts.keys())

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
