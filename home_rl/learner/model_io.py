"""Loading a dense or HOME checkpoint for training, and writing the trained model back as the same kind.

Under ZeRO-3 no learner ever holds a whole model: a HOME model is built inside `deepspeed.zero.Init`,
which partitions each module's weights over the ranks as the module is built (the extra experts are
new modules, not deep copies, which partitioned modules cannot be), then filled one decoder layer at a
time: the layer is gathered whole, rank 0 reads its tensors lazily from the safetensors (a frozen copy
reads the tensors of the expert it copies) and leaving the gather broadcasts and re-partitions them.
A learner's loading memory is its partition plus one layer. Dense models are built under
transformers' `HfDeepSpeedConfig`, DeepSpeed's documented route (raw `zero.Init()` around
transformers' from_pretrained left MoE-style expert weights uninitialised; the HOME load fills every
tensor itself and checks that the checkpoint has them all). Stages 0-2 load in plain torch, one tensor
at a time, and DeepSpeed shards the optimiser at `initialize`.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from home_rl.errors import ConfigError
from home_rl.learner.config import frozen_copy_map
from home_rl.model import DTYPES, HomeModel, is_home_checkpoint
from home_rl.model.home import read_home_config
from home_rl.model.architectures import architecture_of, model_class, read_config_json

log = logging.getLogger(__name__)

# Files of a model folder that the trained folder gets as they are (tokenizer, processor, chat template).
_ASSET_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
_NOT_ASSETS = ("config.json", "generation_config.json", "model.safetensors.index.json")


def load_for_training(path: str | Path, dtype: torch.dtype, ds_config: dict,
                      frozen_copies: list[str]) -> tuple[nn.Module, bool]:
    """(model in train mode, is_home). `frozen_copies` are NAME=EXPERT copies added to every HybridMLP."""
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if is_home_checkpoint(path):
        model = _load_home(Path(path), dtype, ds_config if zero3 else None, frozen_copies)
        # Under ZeRO-3 every rank must enter the same modules; with per-row routes a rank could
        # otherwise skip an expert that another rank runs and the collective gathers would hang.
        for mlp in model.hybrid_mlps:
            mlp.call_every_expert = True
        return model.train(), True
    if frozen_copies:
        raise ConfigError(f"learner.frozen_copies={frozen_copies} needs a HOME model; {path} is dense")
    arch = architecture_of(read_config_json(path), where=str(Path(path) / "config.json"))
    cls = model_class(arch)
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        ds_hook = HfDeepSpeedConfig(ds_config)  # transformers partitions while loading only while this lives
        model = cls.from_pretrained(path, dtype=dtype)
        del ds_hook
    else:
        model = cls.from_pretrained(path, dtype=dtype)
    return model.train(), False


def _load_home(path: Path, dtype: torch.dtype, zero3_config: dict | None, frozen_copies: list[str]) -> HomeModel:
    """The HOME model with its frozen copies; under ZeRO-3 (`zero3_config`) partitioned from the start."""
    config, home_config = read_home_config(path)
    copies = frozen_copy_map(frozen_copies)
    for name, expert in copies.items():
        if expert not in home_config["experts"]:
            raise ConfigError(f"learner.frozen_copies: {name + '=' + expert!r} copies unknown expert {expert!r}; "
                              f"the model has {home_config['experts']}")
    if zero3_config is None:
        return HomeModel.from_pretrained(path, dtype=dtype, copies=copies)
    import deepspeed

    # The dtype comes from the config's bf16/fp16 switches (set from `dtype`): DeepSpeed 0.19's Init
    # ignores its own dtype argument on a CPU without fp16 and builds in bfloat16.
    with deepspeed.zero.Init(config_dict_or_path=zero3_config):
        model = HomeModel.from_config(config, home_config, dtype, copies)
    _release_freed_memory()

    @contextlib.contextmanager
    def gathered(params: list[nn.Parameter]) -> Iterator[None]:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
        _release_freed_memory()

    model.load_checkpoint_weights(path, copies, gathered=gathered, reads=torch.distributed.get_rank() == 0)
    model.asset_dir = path
    return model


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    The partitioned build frees each module's whole weights once partitioned, and the fill frees each
    gathered layer; glibc keeps such blocks mapped, in holes between live partitions, and the optimiser
    state that deepspeed.initialize allocates next would otherwise come on top of them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_trained(state_dict: dict[str, torch.Tensor], source: str | Path, model: nn.Module, is_home: bool,
                  out_dir: str | Path, dtype: torch.dtype, drop_experts: tuple[str, ...] = ()) -> Path:
    """Write `state_dict` (full, gathered) as a checkpoint of the source's kind, atomically.

    A plain model of the same shape is built (outside ZeRO), given the weights and saved with its
    own save_pretrained, so the folder is exactly what from_pretrained expects. Experts named in
    `drop_experts` (frozen working copies) are left out.
    """
    out = Path(out_dir)
    if is_home:
        home_config = dict(model.home_config)
        home_config["experts"] = [e for e in model.expert_names if e not in drop_experts]
        fresh = HomeModel.from_config(model.base.config, home_config, dtype=dtype)
        state = {k: v for k, v in state_dict.items()
                 if not any(f".experts.{e}." in k for e in drop_experts)}
        _load_exact(fresh, state)
        fresh.asset_dir = Path(source)
        fresh.base.generation_config = model.base.generation_config
        fresh.save_pretrained(out)  # atomic: the HOME writer renames a temporary folder
        return out
    from transformers import initialization as hf_init

    with hf_init.no_init_weights():
        fresh = type(model)._from_config(model.config, dtype=dtype)
    fresh.tie_weights()
    _load_exact(fresh, state_dict)
    fresh.generation_config = model.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    _copy_assets(Path(source), tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied LM head is one tensor with two names: whichever name the state holds fills both.
    missing = [k for k in missing if not _is_tied_alias(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"trained weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _is_tied_alias(model: nn.Module, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return key in params and key not in unique


def _copy_assets(source: Path, dest: Path) -> None:
    for f in source.iterdir():
        if f.is_file() and f.name.endswith(_ASSET_SUFFIXES) and f.name not in _NOT_ASSETS and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]
