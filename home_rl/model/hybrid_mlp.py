"""HybridMLP: a decoder layer's MLP split into named experts, chosen per sequence.

Routing in HOME is a hard choice per query, so a forward pass carries one expert name per
sequence (or one name for the whole batch). Each expert runs only on the rows routed to it.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from home_rl.experts import FAST, THINK
from home_rl.model.lora_expert import LoraExpert, LoraSpec

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
    def upcycled(cls, dense_mlp: nn.Module, lora: Optional[LoraSpec] = None) -> "HybridMLP":
        """Both experts start as the dense MLP (upcycling): think a copy of it, or (`lora`) the dense MLP
        itself plus an adapter that adds nothing yet."""
        if lora is None:
            return cls({FAST: dense_mlp, THINK: copy.deepcopy(dense_mlp)})
        think = LoraExpert(dense_mlp, lora)
        think.reset_parameters()
        return cls({FAST: dense_mlp, THINK: think})

    @classmethod
    def shaped_like(cls, mlp: nn.Module, names: Sequence[str], lora: Optional[LoraSpec] = None) -> "HybridMLP":
        """Experts `names` for weights loaded afterwards: `mlp` itself is the first (fast), the others are
        new modules of its class, or (`lora`) adapters over it. New modules, not copies: under
        deepspeed.zero.Init each is partitioned as it is built, whereas a deep copy of a partitioned module
        is no ZeRO module (its parameters are empty placeholders that claim the original's ZeRO identity)."""
        if lora is not None:
            return cls({name: mlp if i == 0 else LoraExpert(mlp, lora) for i, name in enumerate(names)})
        if not hasattr(mlp, "config"):
            raise TypeError(f"{type(mlp).__name__} keeps no config to build more experts of its shape from")
        # In `mlp`'s dtype: built in torch's default (float32), a bfloat16 model's think expert was saved in float32.
        dtype, default = next(mlp.parameters()).dtype, torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return cls({name: mlp if i == 0 else type(mlp)(mlp.config) for i, name in enumerate(names)})
        finally:
            torch.set_default_dtype(default)

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
