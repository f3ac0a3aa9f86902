"""What trains and how: freezing by name patterns, AdamW parameter groups, the LR schedule.

Plain torch, shared by the DeepSpeed workers and by any single-process reference.
"""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from home_rl.errors import ConfigError


def name_matches(name: str, pattern: str) -> bool:
    """A pattern is a glob, optionally followed by exclusions: "* -*.experts.* -router.*"."""
    include, *excludes = pattern.split(" -")
    return fnmatch.fnmatchcase(name, include.strip()) and not any(
        fnmatch.fnmatchcase(name, e.strip()) for e in excludes)


def select_trainable(model: nn.Module, patterns: list[str], never: tuple[str, ...] = ()) -> list[str]:
    """Freeze every parameter whose name matches none of `patterns` (or matches one of `never`).

    Returns the trainable names. Must run before DeepSpeed sees the model: ZeRO builds its
    optimiser partitions from the parameters that require grad at initialisation.
    """
    trainable = []
    for name, param in model.named_parameters():
        keep = any(name_matches(name, p) for p in patterns) and not any(name_matches(name, p) for p in never)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        sample = ", ".join(n for n, _ in list(model.named_parameters())[:4])
        raise ConfigError(f"learner.trainable={patterns} matches no parameter of this model "
                          f"(names look like: {sample}, ...)")
    return trainable


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: decay on matrices, none on biases and norm weights."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _is_vector(param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_vector(param: torch.Tensor) -> bool:
    # Under ZeRO-3 a partitioned parameter is empty locally; its full shape is kept in ds_shape.
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) < 2


class WarmupSchedule:
    """LR multiplier per optimizer step: linear warm-up, then constant, cosine or linear decay.

    A callable object (not a lambda) so that LambdaLR's state_dict, saved in checkpoints, holds it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, kind: str = "constant", min_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.kind, self.min_ratio = warmup_steps, total_steps, kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps - 1, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.kind == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - progress)
        raise ConfigError(f"unknown learner.lr_schedule {self.kind!r}")
