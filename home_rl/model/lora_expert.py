"""A LoRA think expert: the fast expert's MLP plus a low-rank adapter on its projections.

With a LoRA think expert (`home_config["think_lora"]`), every expert but fast holds no MLP of its own:
it runs fast's projections, which it does not own (so they are frozen by construction and stored once,
as fast's), and adds scaling * B(A(x)) to each target projection, as PEFT's LoRA does. The adapter
starts as PEFT starts one: A random, B zero, so think = fast at upcycling.

A HOME checkpoint keeps the think adapter as a PEFT adapter folder over the fast view (`think_adapter/`:
adapter_config.json written by PEFT itself, adapter_model.safetensors under PEFT's names), so PEFT
loads it onto the fast view and vLLM serves it as a LoRA of the fast view, as it is.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from home_rl.errors import ModelError

ADAPTER_DIR = "think_adapter"  # the think adapter's folder inside a HOME checkpoint
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix before the wrapped model's own module names
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the MLP projections of every supported architecture


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape, as recorded in a HOME checkpoint's config (home.think_lora)."""
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # scaling = alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (0: learner and engine compute the same function)
    targets: tuple[str, ...] = PROJECTIONS  # which MLP projections get an adapter

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ModelError(f"think_lora.rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ModelError(f"think_lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise ModelError(f"think_lora.targets {list(self.targets)}: each must be one of {list(PROJECTIONS)} "
                             "(at least one)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_home_config(cls, home_config: dict) -> Optional["LoraSpec"]:
        """The spec recorded in a HOME config; None for a full think expert."""
        raw = home_config.get("think_lora")
        if raw is None:
            return None
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelError(f"home.think_lora has unknown keys {unknown}")
        return cls(**raw)


class LoraDelta(nn.Module):
    """B(A(x)) of one projection, under PEFT's names (lora_A, lora_B)."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=dtype)

    def reset_parameters(self) -> None:
        """PEFT's start: A as nn.Linear's default, B zero (the adapter adds nothing)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))


class LoraExpert(nn.Module):
    """An expert that is `base` (the fast MLP, not owned) plus an adapter on `spec.targets`."""

    def __init__(self, base: nn.Module, spec: LoraSpec):
        super().__init__()
        missing = [p for p in PROJECTIONS if not isinstance(getattr(base, p, None), nn.Linear)]
        if missing or not hasattr(base, "act_fn"):
            raise ModelError(f"{type(base).__name__} is no gated MLP ({', '.join(PROJECTIONS)}, act_fn): "
                             "a LoRA think expert needs one")
        # Not a submodule: the base weights keep one name (fast's) in the state dict, the optimiser and ZeRO.
        object.__setattr__(self, "base", base)
        self.spec = spec
        self.dropout = nn.Dropout(spec.dropout)
        for name in spec.targets:
            linear = getattr(base, name)
            setattr(self, name, LoraDelta(linear.in_features, linear.out_features, spec.rank, linear.weight.dtype))

    def reset_parameters(self) -> None:
        for name in self.spec.targets:
            getattr(self, name).reset_parameters()

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self.base, name)(x)
        if name in self.spec.targets:
            y = y + self.spec.scaling * getattr(self, name)(self.dropout(x))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project("down_proj", self.base.act_fn(self.project("gate_proj", x)) * self.project("up_proj", x))


# ---------------------------------------------------------------------- names and files


def peft_name(view_key: str) -> str:
    """"model.layers.0.mlp.gate_proj.lora_A.weight" -> PEFT's "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"."""
    return PEFT_PREFIX + view_key


def view_key_of_peft(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise ModelError(f"adapter tensor {key!r} does not start with PEFT's {PEFT_PREFIX!r}")
    return key[len(PEFT_PREFIX):]


def merge_adapter(view: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The dense view `view` (fast's, by the dense model's names) with each adapted projection merged:
    W + scaling * B @ A, computed in float32 and cast back. `adapter` is keyed by view-side adapter names."""
    out = dict(view)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b, weight = adapter[module + ".lora_B.weight"], module + ".weight"
        if weight not in out:
            raise ModelError(f"adapter tensor {key} adapts {weight}, which the view does not have")
        base = out[weight]
        out[weight] = (base.float() + spec.scaling * (b.float() @ a.float())).to(base.dtype)
    return out


def write_adapter(folder: Path, adapter: dict[str, torch.Tensor], spec: LoraSpec, base_model: str = "") -> Path:
    """A PEFT adapter folder: PEFT's own adapter_config.json and the tensors under PEFT's names."""
    import peft
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                    bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model).save_pretrained(str(folder))
    save_file({peft_name(k): v.detach().contiguous().cpu() for k, v in adapter.items()}, folder / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    return folder


def has_lora_think(home_dir: str | Path) -> bool:
    """Whether a HOME checkpoint folder's think expert is a LoRA (read from its config.json alone)."""
    return json.loads((Path(home_dir) / "config.json").read_text()).get("home", {}).get("think_lora") is not None


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"{folder} holds no adapter_config.json: not a PEFT adapter folder")
    return json.loads(path.read_text())
