"""The think adapter a rollout engine answers with, when the think expert is a LoRA over fast.

The engine holds the fast view; every request carries the same vLLM LoRARequest (one id: the prefix cache
and the adapter cache key on it). A new version arrives as tensors, is written to a folder of the engine's
own (vLLM loads adapters from folders) and loaded in place of the last one (`load_inplace`).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from home_rl.experts import THINK
from home_rl.model.lora_expert import ADAPTER_WEIGHTS, peft_name, read_adapter_config

LORA_ID = 1  # the adapter's id in the engine: one adapter, whatever its version
ADAPTER_BACKEND = "adapter"  # how a pool serving an adapter receives weights: its tensors, through Ray (megabytes)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank `rank`."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def engine_args(folder: str | Path) -> dict:
    """What a vLLM engine that applies the adapter in `folder` (one adapter at a time) starts with."""
    rank = int(read_adapter_config(Path(folder))["r"])
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": max_lora_rank(rank)}


def think_request(folder: str | Path, load_inplace: bool = False) -> Any:
    """The vLLM LoRARequest of the think adapter in `folder` (`load_inplace`: replacing the loaded version)."""
    from home_rl import vllm_names as vn

    return vn.LoRARequest(THINK, LORA_ID, str(folder), load_inplace=load_inplace)


class EngineAdapter:
    """A rollout engine's think adapter: the request every generation carries, and the folders its versions are in."""

    def __init__(self, folder: str, worker_rank: int):
        self.initial = Path(folder)
        self.engine_args = engine_args(self.initial)
        self.root = Path(tempfile.mkdtemp(prefix=f"home-rl-adapter-{worker_rank}-"))
        self.request = think_request(self.initial)

    def write(self, tensors: dict[str, torch.Tensor], version: int) -> Any:
        """Write `tensors` (view-side adapter names) as version `version`; the request that loads it in place.
        Folders older than the previous version are removed (the engine has loaded them)."""
        from safetensors.torch import save_file

        folder = self.root / f"v{version}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy2(self.initial / "adapter_config.json", folder / "adapter_config.json")
        save_file({peft_name(k): v.contiguous() for k, v in tensors.items()}, folder / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        previous = Path(self.request.lora_path)
        for old in self.root.iterdir():
            if old not in (folder, previous):
                shutil.rmtree(old, ignore_errors=True)
        self.request = think_request(folder)
        return think_request(folder, load_inplace=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
