"""The base architectures a HOME model can be built from, and where each keeps its decoder layers."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import transformers
from torch import nn

from home_rl.errors import ModelError


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # the transformers class, as in config.json's "architectures"
    layers: str  # attribute path from the model to its decoder layers (an nn.ModuleList)
    multimodal: bool  # takes images (pixel_values, image_grid_thw)


SUPPORTED = {
    a.name: a
    for a in (
        Architecture("Qwen2_5_VLForConditionalGeneration", "model.language_model.layers", True),
        Architecture("Qwen2ForCausalLM", "model.layers", False),
        Architecture("LlamaForCausalLM", "model.layers", False),
    )
}


def architecture_of(config: dict | transformers.PretrainedConfig, where: str = "") -> Architecture:
    """The supported architecture named by a config; otherwise a ModelError listing the supported ones."""
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    name = (archs or [None])[0]
    if name not in SUPPORTED:
        raise ModelError(f"unsupported model architecture {name!r}{f' in {where}' if where else ''}; "
                         f"supported: {', '.join(SUPPORTED)}")
    return SUPPORTED[name]


def read_config_json(folder: str | Path) -> dict:
    """config.json of a model folder, with a clear error when the folder or file is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"not a model folder (no config.json): {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"cannot parse {path}: {e}") from None


def model_class(arch: Architecture) -> type:
    return getattr(transformers, arch.name)


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    obj = model
    for attr in arch.layers.split("."):
        obj = getattr(obj, attr)
    return obj


def text_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The language model's part of a config (VLMs nest it as text_config)."""
    return getattr(config, "text_config", None) or config


def tied_embeddings(config: transformers.PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text_config(config), "tie_word_embeddings", False))
