"""HomeModel: a base model whose decoder MLPs are HybridMLPs (fast / think), plus a router.

A HOME checkpoint is an HF-style folder: the base config.json with an added "home" section, the
weights as safetensors under this module's own parameter names (`base.…`, `router.…`), and the
tokenizer/processor files of the dense model it came from. An *expert view* is the shared weights
plus one expert under the dense model's own names: a plain checkpoint for transformers and vLLM.
"""
from __future__ import annotations

import contextlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Mapping, Optional, Sequence, Union

import torch
import transformers
import transformers.initialization as hf_init
from safetensors import safe_open
from transformers.core_model_loading import revert_weight_conversion
from torch import nn

from home_rl.errors import ModelError
from home_rl.model.architectures import (Architecture, architecture_of, decoder_layers, model_class,
                                         read_config_json, text_config)
from home_rl.experts import EXPERTS, FAST, THINK
from home_rl.model import lora_expert
from home_rl.model.hybrid_mlp import HybridMLP, Route
from home_rl.model.lora_expert import ADAPTER_DIR, ADAPTER_WEIGHTS, LoraSpec
from home_rl.model.model_folder import write_folder
from home_rl.model.router import Router, pool

HOME_KEY = "home"  # the section of config.json that makes a folder a HOME checkpoint
_EXPERT_IN_NAME = re.compile(r"\.mlp\.experts\.([^.]+)\.")


def view_name(name: str, expert: str) -> Optional[str]:
    """The dense-model name of a HomeModel parameter in `expert`'s view; None if not part of it.

    "base.model.layers.0.mlp.experts.think.up_proj.weight" -> "model.layers.0.mlp.up_proj.weight".
    """
    if not name.startswith("base."):
        return None  # the router is in no view
    m = _EXPERT_IN_NAME.search(name)
    if m is None:
        return name[len("base."):]
    if m.group(1) != expert:
        return None
    return name[len("base."):m.start()] + ".mlp." + name[m.end():]


def is_home_checkpoint(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and HOME_KEY in json.loads(path.read_text())


class HomeModel(nn.Module):
    def __init__(self, base: transformers.PreTrainedModel, home_config: dict):
        super().__init__()
        self.arch = architecture_of(base.config)
        self.base = base
        self.home_config = dict(home_config)
        hidden = text_config(base.config).hidden_size
        self.router = Router(hidden, self.home_config["router_hidden_size"]).to(base.dtype)
        self.asset_dir: Optional[Path] = None  # where tokenizer/processor files are copied from

    # ------------------------------------------------------------------ construction

    @classmethod
    def upcycle(cls, dense: transformers.PreTrainedModel, router_layer: Optional[int] = None,
                router_pooling: str = "mean", router_hidden_size: int = 256,
                think_lora: Optional[LoraSpec] = None) -> "HomeModel":
        """Turn a dense model (in place) into a HOME model: each decoder MLP becomes {fast, think} copies, or
        (`think_lora`) fast plus a think adapter over it (home_rl/model/lora_expert.py)."""
        arch = architecture_of(dense.config)
        layers = decoder_layers(dense, arch)
        for layer in layers:
            layer.mlp = HybridMLP.upcycled(layer.mlp, think_lora)
        if router_layer is None:
            router_layer = len(layers) // 2
        if not 0 <= router_layer < len(layers):
            raise ModelError(f"router.layer={router_layer} is outside the model's {len(layers)} decoder layers")
        return cls(dense, {"experts": list(EXPERTS), "router_layer": router_layer,
                           "router_pooling": router_pooling, "router_hidden_size": router_hidden_size,
                           "base_architecture": arch.name,
                           **({"think_lora": think_lora.as_dict()} if think_lora else {})})

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig, home_config: dict,
                    dtype: Optional[torch.dtype] = None, copies: Optional[Mapping[str, str]] = None) -> "HomeModel":
        """An uninitialised HOME model of this shape (weights are loaded by the caller).

        Its experts are home_config's plus the frozen `copies` (name -> the expert whose weights it
        gets at loading, e.g. think_ref -> think). Every module is built new, none copied, so this also
        builds inside deepspeed.zero.Init, which partitions each module's weights as it is built.
        """
        arch = architecture_of(config)
        if isinstance(dtype, str) or dtype is None:
            dtype = getattr(torch, dtype or str(config.dtype or "float32").replace("torch.", ""))
        copies = dict(copies or {})
        unknown = sorted(e for e in copies.values() if e not in home_config["experts"])
        if unknown:
            raise ValueError(f"copies of unknown expert(s) {unknown}; the checkpoint has {home_config['experts']}")
        names = list(home_config["experts"]) + [n for n in copies if n not in home_config["experts"]]
        lora = LoraSpec.from_home_config(home_config)
        with hf_init.no_init_weights():  # every weight is overwritten by the checkpoint: skip random init
            base = model_class(arch)._from_config(config, dtype=dtype)
            base.tie_weights()  # skipped under no_init_weights; a tied LM head must share the embedding
            for layer in decoder_layers(base, arch):
                layer.mlp = HybridMLP.shaped_like(layer.mlp, names, lora)
                for name in copies:
                    layer.mlp.experts[name].requires_grad_(False)
            return cls(base, home_config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: Optional[torch.dtype] = None,
                        copies: Optional[Mapping[str, str]] = None) -> "HomeModel":
        """A HOME checkpoint in plain torch, plus the frozen `copies` (name -> expert) if given."""
        folder = Path(folder)
        config, home_config = read_home_config(folder)
        model = cls.from_config(config, home_config, dtype, copies)
        model.load_checkpoint_weights(folder, copies)
        model.asset_dir = folder
        return model.eval()

    def load_checkpoint_weights(self, folder: Path, copies: Optional[Mapping[str, str]] = None,
                                gathered: Optional[Callable[[list[nn.Parameter]], ContextManager]] = None,
                                reads: bool = True) -> None:
        """Fill the model from a HOME folder's safetensors, one group at a time (a decoder layer, a vision
        block, another module's own tensors), reading each tensor from its file as it is copied in: the
        file is never in memory as a whole. Missing, unexpected or misshapen tensors are a ModelError.

        `copies` (name -> expert): expert `name` gets `expert`'s tensors. A partitioned (ZeRO-3) model
        passes `gathered(params)`, a context in which a group's parameters are whole and what the reading
        rank writes reaches every rank, and `reads`: whether this rank reads parameters. Every rank
        checks the headers, so a bad checkpoint fails on all ranks alike rather than hanging the others.
        """
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"no *.safetensors weights in {folder}")
        if (folder / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file():
            files.append(folder / ADAPTER_DIR / ADAPTER_WEIGHTS)
        where, shapes, in_file = {}, {}, {}  # by model key: its file, shape and name in that file
        for f in files:
            with safe_open(f, framework="pt", backend="pread") as st:
                for key in st.keys():
                    own_key = _adapter_home_key(key) if f.parent.name == ADAPTER_DIR else key
                    where[own_key], in_file[own_key] = f, key
                    shapes[own_key] = tuple(st.get_slice(key).get_shape())
        own = self.state_dict(keep_vars=True)  # the parameters themselves: a partitioned one is filled when gathered
        sources = {key: _copy_source(key, copies or {}) for key in self.checkpoint_keys()}
        missing = sorted(set(sources.values()) - set(where))
        unexpected = sorted(set(where) - set(own))
        if missing or unexpected:
            raise ModelError(f"HOME checkpoint {folder} does not match its config: "
                             + (f"missing tensors {_short_list(missing)}" if missing else "")
                             + ("; " if missing and unexpected else "")
                             + (f"unexpected tensors {_short_list(unexpected)}" if unexpected else ""))
        misshapen = [f"{src} {list(shapes[src])} for {list(_full_shape(own[key]))}" for key, src in sources.items()
                     if shapes[src] != _full_shape(own[key])]
        if misshapen:
            raise ModelError(f"HOME checkpoint {folder} does not match its config: tensors of another shape "
                             f"{_short_list(misshapen)}")
        for group in _load_groups(list(sources)):
            params = [own[key] for key in group if isinstance(own[key], nn.Parameter)]
            with (gathered(params) if gathered else contextlib.nullcontext()), torch.no_grad():
                for f in sorted({where[sources[key]] for key in group}):
                    # pread, not mmap: the file's pages read through a map would count as this process's memory.
                    with safe_open(f, framework="pt", backend="pread") as st:
                        for key in group:
                            # A buffer is whole on every rank (ZeRO partitions parameters only): each reads its own.
                            if where[sources[key]] == f and (reads or not isinstance(own[key], nn.Parameter)):
                                own[key].copy_(st.get_tensor(in_file[sources[key]]))

    # ------------------------------------------------------------------ forward

    @property
    def hybrid_mlps(self) -> list[HybridMLP]:
        return [layer.mlp for layer in decoder_layers(self.base, self.arch)]

    @property
    def expert_names(self) -> list[str]:
        return self.hybrid_mlps[0].names

    def forward(self, route: Union[Route, Sequence[str]] = THINK, **inputs):
        """Run the base model with every sequence on the expert `route` names (one name, or one per row)."""
        with self.routed(route):
            return self.base(**inputs)

    @contextmanager
    def routed(self, route: Union[Route, Sequence[str]]) -> Iterator[None]:
        """Within this context, the HybridMLPs send each row to its expert."""
        mlps = self.hybrid_mlps
        names = mlps[0].names
        if isinstance(route, str):
            if route not in names:
                raise ValueError(f"unknown expert {route!r}; this model has {names}")
        elif not isinstance(route, torch.Tensor):
            unknown = sorted(set(route) - set(names))
            if unknown:
                raise ValueError(f"unknown expert(s) {unknown}; this model has {names}")
            route = torch.tensor([names.index(r) for r in route], device=self.base.device)
        for mlp in mlps:
            mlp.route = route
        try:
            yield
        finally:
            for mlp in mlps:
                mlp.route = THINK

    def router_features(self, **inputs) -> torch.Tensor:
        """Pooled hidden states after the router's layer of the fast view: [batch, hidden]."""
        at = (self.home_config["router_layer"], self.home_config["router_pooling"])
        return self.hidden_features([at], **inputs)[at]

    def hidden_features(self, candidates: list[tuple[int, str]], **inputs) -> dict[tuple[int, str], torch.Tensor]:
        """Pooled hidden states of the fast view after each (decoder layer, pooling) of `candidates`, from one
        forward pass that stops after the deepest of them: {(layer, pooling): [batch, hidden]}."""
        layers = decoder_layers(self.base, self.arch)
        wanted = sorted({layer for layer, _ in candidates})
        if wanted[0] < 0 or wanted[-1] >= len(layers):
            raise ValueError(f"router layers {wanted} outside the model's {len(layers)} decoder layers")
        captured: dict[int, torch.Tensor] = {}

        def keep(index: int):
            def hook(module, args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == wanted[-1]:
                    raise _EnoughLayers  # the layers above the deepest wanted are not needed
            return hook

        handles = [layers[i].register_forward_hook(keep(i)) for i in wanted]
        try:
            self.forward(route=FAST, **inputs)
        except _EnoughLayers:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {(layer, how): pool(captured[layer], inputs.get("attention_mask"), how) for layer, how in candidates}

    def route_logits(self, **inputs) -> torch.Tensor:
        """Router logits [batch, 2] for [fast, think]."""
        return self.router(self.router_features(**inputs))

    # ------------------------------------------------------------------ saving

    def checkpoint_keys(self) -> list[str]:
        """State-dict keys that a checkpoint stores: tied copies (a tied LM head) are stored once."""
        seen, keys = set(), []
        # By identity, not storage: a partitioned (ZeRO-3) parameter's local storage is empty.
        for key, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            keys.append(key)
        return keys

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a HOME checkpoint folder, atomically (a temporary folder renamed at the end)."""
        spec = LoraSpec.from_home_config(self.home_config)
        state = self.state_dict()
        # a LoRA think expert's adapter goes to its own folder, not into the shards
        stored = [k for k in self.checkpoint_keys() if not (spec and f".experts.{THINK}." in k)]
        config = self.base.config.to_dict()
        config[HOME_KEY] = {**self.home_config, "experts": self.expert_names}

        def write_adapter(folder: Path) -> None:  # the think adapter as a PEFT folder over the fast view
            self.export_adapter(folder / ADAPTER_DIR)

        return write_folder(out_dir, config, {k: state[k] for k in stored}, self.asset_dir, self.base.generation_config,
                            write_adapter if spec else None)

    def view_state_dict(self, expert: str) -> dict[str, torch.Tensor]:
        """The shared weights plus `expert`, under the dense model's names (tied copies once); a LoRA expert's
        view is the fast view with its adapter merged in."""
        if expert not in self.expert_names:
            raise ValueError(f"unknown expert {expert!r}; this model has {self.expert_names}")
        spec = LoraSpec.from_home_config(self.home_config)
        state = self.state_dict()
        out = {}
        for key in self.checkpoint_keys():
            name = view_name(key, FAST if spec and expert != FAST else expert)
            if name is not None:
                out[name] = state[key]
        if spec and expert != FAST:
            out = lora_expert.merge_adapter(out, self._adapter_state(expert), spec)
        return out

    def export_view(self, expert: str, out_dir: str | Path) -> Path:
        """Write `expert`'s view: a dense checkpoint of the base architecture that needs no custom code.

        Names are written as transformers' own save_pretrained writes them (its on-disk format, e.g.
        Qwen2.5-VL's `visual.*` and `model.layers.*`), which is what vLLM's loaders expect.
        """
        state = revert_weight_conversion(self.base, self.view_state_dict(expert))
        return write_folder(out_dir, self.base.config.to_dict(), state, self.asset_dir, self.base.generation_config)

    def export_adapter(self, out_dir: str | Path, expert: str = THINK) -> Path:
        """Write a LoRA expert's adapter as a PEFT adapter folder over the fast view (what the checkpoint keeps in
        think_adapter/), for PEFT and vLLM."""
        spec = LoraSpec.from_home_config(self.home_config)
        if spec is None or expert == FAST:
            raise ModelError(f"expert {expert!r} of this HOME model has no adapter (home.think_lora: {spec})")
        return lora_expert.write_adapter(Path(out_dir), self._adapter_state(expert), spec)

    def _adapter_state(self, expert: str) -> dict[str, torch.Tensor]:
        """A LoRA expert's adapter tensors under the view's names ("model.layers.0.mlp.gate_proj.lora_A.weight")."""
        state = self.state_dict()
        return {view_name(k, expert): state[k] for k in self.checkpoint_keys() if f".experts.{expert}." in k}

    # ------------------------------------------------------------------ reporting

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts: total, shared, each expert, router, and active per query (shared + one expert)."""
        counts = {"total": 0, "shared": 0, **{e: 0 for e in self.expert_names}, "router": 0}
        seen = set()
        for name, p in self.named_parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            n = p.numel()
            counts["total"] += n
            m = _EXPERT_IN_NAME.search(name)
            if name.startswith("router."):
                counts["router"] += n
            elif m:
                counts[m.group(1)] += n
            else:
                counts["shared"] += n
        lora = LoraSpec.from_home_config(self.home_config) is not None  # a LoRA think runs fast's projections too
        counts["active_per_query"] = counts["shared"] + counts[THINK] + (counts[FAST] if lora else 0)
        return counts


class _EnoughLayers(Exception):
    """Raised from a forward hook to stop a forward pass once the router's layer has run."""


def read_home_config(folder: Path) -> tuple[transformers.PretrainedConfig, dict]:
    """(base config, home section) of a HOME checkpoint folder; a dense folder is a ModelError."""
    raw = read_config_json(folder)
    if HOME_KEY not in raw:
        raise ModelError(f"{folder} is a dense checkpoint, not a HOME one (no '{HOME_KEY}' section in "
                         f"config.json): upcycle it first with recipes/upcycle.py")
    architecture_of(raw, where=str(Path(folder) / "config.json"))
    config = transformers.AutoConfig.from_pretrained(folder)
    home_config = getattr(config, HOME_KEY)
    delattr(config, HOME_KEY)
    return config, home_config


def _adapter_home_key(peft_key: str) -> str:
    """The HOME name of a think-adapter tensor stored under PEFT's name (inverse of view_name + peft_name)."""
    view_key = lora_expert.view_key_of_peft(peft_key)
    head, sep, tail = view_key.partition(".mlp.")
    if not sep:
        raise ModelError(f"adapter tensor {peft_key!r} is not on an MLP projection")
    return f"base.{head}.mlp.experts.{THINK}.{tail}"


def _copy_source(key: str, copies: Mapping[str, str]) -> str:
    """The checkpoint tensor that fills `key`: a copied expert's own name replaced by its source's."""
    m = _EXPERT_IN_NAME.search(key)
    if m is None or m.group(1) not in copies:
        return key
    return key[:m.start(1)] + copies[m.group(1)] + key[m.end(1):]


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))  # a partitioned parameter keeps its shape in ds_shape


_GROUP = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


def _load_groups(keys: list[str]) -> list[list[str]]:
    """Keys (in module order) in the groups that are loaded together: a decoder layer or vision block,
    else one module's own tensors."""
    groups: list[list[str]] = []
    last = None
    for key in keys:
        m = _GROUP.match(key)
        group = m.group(1) if m else key.rpartition(".")[0]
        if group != last:
            groups.append([])
            last = group
        groups[-1].append(key)
    return groups


def _short_list(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")
