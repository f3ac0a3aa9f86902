"""Writing a model folder: config.json, safetensors shards, the tokenizer/processor files, atomically."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
SHARD_BYTES = 4 << 30  # safetensors shards of at most 4 GiB
# Files of a model folder that are not weights or config: tokenizer, processor, chat template.
_NOT_ASSETS = re.compile(r"(\.safetensors|\.bin|\.gguf|\.pt|^config\.json|\.index\.json)$")


def write_folder(out_dir: str | Path, config: dict, state: dict[str, torch.Tensor], asset_dir: Optional[Path],
                 generation_config=None, extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write config.json, safetensors shards and copied tokenizer/processor files (and what `extra` writes into
    the folder); rename into place."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if asset_dir is not None:
        for f in Path(asset_dir).iterdir():
            if f.is_file() and not _NOT_ASSETS.search(f.name):
                shutil.copy2(f, tmp / f.name)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    _save_shards({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
    if extra is not None:
        extra(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _save_shards(state: dict[str, torch.Tensor], folder: Path) -> None:
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
