"""Upcycling: a dense checkpoint folder becomes a HOME model (both experts start as the dense MLP)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from home_rl.model.architectures import architecture_of, model_class, read_config_json
from home_rl.model.home import HOME_KEY, HomeModel
from home_rl.model.lora_expert import LoraSpec
from home_rl.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dense(folder: str | Path, dtype: torch.dtype | str = torch.float32):
    """Load a dense checkpoint of a supported architecture (checked before any weight is read).
    dtype="auto" keeps the checkpoint's own dtype (transformers reads it from config.json)."""
    raw = read_config_json(folder)
    if HOME_KEY in raw:
        raise ModelError(f"{folder} is already a HOME checkpoint: load it with HomeModel.from_pretrained")
    arch = architecture_of(raw, where=str(Path(folder) / "config.json"))
    return model_class(arch).from_pretrained(folder, dtype=dtype).eval()


def upcycle(folder: str | Path, dtype: torch.dtype | str = torch.float32, router_layer: Optional[int] = None,
            router_pooling: str = "mean", router_hidden_size: int = 256, think_lora: Optional[LoraSpec] = None) -> HomeModel:
    """Load the dense model in `folder` and upcycle it (`think_lora`: think is an adapter over fast, drawn from
    torch's global generator); tokenizer/processor files travel with it."""
    home = HomeModel.upcycle(load_dense(folder, dtype), router_layer, router_pooling, router_hidden_size, think_lora)
    home.asset_dir = Path(folder)
    return home.eval()
