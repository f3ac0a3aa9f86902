"""The model's shapes from its config.json alone: exact parameter counts by what they are to the learner
(trainable, frozen, frozen copies such as think_ref, vision tower), counted on the `meta` device and cached."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from home_rl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelShape:
    path: str
    is_home: bool
    multimodal: bool
    params: int  # every parameter the learner holds (frozen copies included)
    trainable: int  # what the optimiser updates
    frozen_copies: int  # parameters of the frozen expert copies (e.g. think_ref)
    vision: int  # parameters of the vision tower
    view: int  # parameters of one expert view (what a rollout engine serves); the whole model when dense
    home_checkpoint: int  # parameters of the checkpoint on disk (no frozen copies)
    largest_layer: int  # parameters of the largest decoder layer, every expert: what ZeRO-3 gathers at once
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_dim: int  # key/value heads x head size
    context: int  # max_position_embeddings of the language model
    disk_bytes: int  # bytes per parameter on disk (the config's dtype)
    adapted: int = 0  # a LoRA think expert: parameters of the projections it adapts (what merged-view engines receive)

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


def model_shape(model_dir: str | Path, trainable: Any = "all", frozen_copies: Sequence[str] = ()) -> ModelShape:
    """Exact parameter counts of the model in `model_dir` (its config.json alone) as a learner holds it.

    Counting builds the model on the meta device, which needs transformers' modelling code: importing it
    takes 3-7 s on the 2-core machine, more than the rest of a plan. The counts of a config.json (and trainable
    set) are therefore kept in the cache (~/.cache/home_rl/shapes) and read back by the next plan of it."""
    folder = Path(model_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json to plan from")
    key = hashlib.sha256(config_path.read_bytes() + json.dumps([str(trainable), list(frozen_copies)]).encode())
    cached = _cache_root() / "shapes" / f"{key.hexdigest()[:32]}.json"
    if cached.is_file():
        try:
            return ModelShape(**{**json.loads(cached.read_text()), "path": str(folder)})
        except (TypeError, ValueError):  # written by an earlier version of ModelShape: count again
            pass
    shape = _count(folder, trainable, frozen_copies)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(shape)))
        tmp.replace(cached)
    except OSError:  # a read-only cache only costs the next plan its time
        pass
    return shape


def _cache_root() -> Path:
    # home_rl.model.embedded.cache_dir, without importing the model package (transformers) for it
    return Path(os.environ.get("HOME_RL_CACHE", Path.home() / ".cache" / "home_rl"))


def _count(folder: Path, trainable: Any, frozen_copies: Sequence[str]) -> ModelShape:
    import torch
    import transformers

    from home_rl.learner.config import frozen_copy_map, trainable_patterns
    from home_rl.learner.optim import name_matches
    from home_rl.model import HomeModel, view_name
    from home_rl.model.home import HOME_KEY
    from home_rl.model.lora_expert import LoraSpec
    from home_rl.model.architectures import architecture_of, decoder_layers, model_class, read_config_json, text_config

    raw = read_config_json(folder)
    arch = architecture_of(raw, where=str(folder / "config.json"))
    is_home = HOME_KEY in raw
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        if is_home:
            home_config = getattr(config, HOME_KEY)
            delattr(config, HOME_KEY)
            model = HomeModel.from_config(config, home_config, dtype=torch.float32,
                                          copies=frozen_copy_map(frozen_copies))
            layers = decoder_layers(model.base, arch)
        else:
            if frozen_copies:
                raise ConfigError(f"learner.frozen_copies={list(frozen_copies)} needs a HOME model; {folder} is dense")
            model = model_class(arch)._from_config(config, dtype=torch.float32)
            layers = decoder_layers(model, arch)
    patterns = trainable_patterns(trainable)
    copies = tuple(f"*.experts.{name}.*" for name in frozen_copy_map(frozen_copies))
    counts = dict(params=0, trainable=0, frozen_copies=0, vision=0, view=0, adapted=0)
    spec = LoraSpec.from_home_config(model.home_config) if is_home else None
    lora = spec is not None
    targets = tuple(f".experts.fast.{t}." for t in (spec.targets if lora else ()))
    for name, p in model.named_parameters():
        n = p.numel()
        counts["params"] += n
        in_copy = any(name_matches(name, c) for c in copies)
        counts["frozen_copies"] += n if in_copy else 0
        counts["trainable"] += n if any(name_matches(name, q) for q in patterns) and not in_copy else 0
        counts["vision"] += n if ".visual." in f".{name}" else 0
        counts["adapted"] += n if any(t in name for t in targets) else 0
        # what an engine holds: the think view; with a LoRA think expert, the fast view and the adapter
        in_view = view_name(name, "think") is not None or (lora and view_name(name, "fast") is not None)
        counts["view"] += n if (not is_home or in_view) else 0
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    text = text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or text_dtype(raw) or "float32")
    return ModelShape(path=str(folder), is_home=is_home, multimodal=arch.multimodal, largest_layer=largest,
                      home_checkpoint=counts["params"] - counts["frozen_copies"], hidden=text.hidden_size,
                      intermediate=text.intermediate_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
                      kv_dim=kv_heads * head_dim, context=int(getattr(text, "max_position_embeddings", 0) or 0),
                      disk_bytes=_dtype_bytes(dtype), **counts)


def text_dtype(raw: dict) -> Optional[str]:
    text = raw.get("text_config") or {}
    return text.get("torch_dtype") or text.get("dtype")


def _dtype_bytes(name: str) -> int:
    return 4 if "32" in str(name) else 2


def planned_model_dir(path: str, embedded_home: bool = False) -> Path:
    """The folder whose config.json describes `path` (model.path, or a checkpoint): itself, or an embedded model's
    cached folder (`embedded_home`: its HOME cold start, which GRPO trains; else the dense model, which SFT
    trains). Never builds or converts anything."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder
    from home_rl.model.embedded import EMBEDDED, cache_dir

    if path not in EMBEDDED:
        raise ConfigError(f"model.path={path}: no config.json there to plan from")
    folder = cache_dir() / "models" / (f"{path}-home" if embedded_home else path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path={path}: its cached model {folder} is not built yet; run the recipe once "
                          f"(it builds it) or give model.path=FOLDER")
    return folder
