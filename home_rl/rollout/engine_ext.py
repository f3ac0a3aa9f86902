"""Weight loading inside a vLLM worker: a mixin vLLM adds to its Worker class (`worker_extension_cls`).

The engine calls these by name through `collective_rpc`, so they reach the worker whether it runs
inside the rollout actor (CPU build, in-process engine) or in vLLM's own processes (CUDA build with
tensor parallelism): one code path, no pickled functions.

An update is a session: `home_rl_begin_update`, any number of `home_rl_load_bucket`, then
`home_rl_finish_update`. It is vLLM's layerwise reload (what `reload_weights` does) spread over
several calls: each layer buffers what it receives and is re-processed (on CPU: its GEMM weights
re-packed) once all its tensors are in, so a fused layer (q/k/v -> qkv_proj, gate/up ->
gate_up_proj) may receive its parts in different buckets. Layers that receive nothing keep their
tensors untouched. Two quirks need care:

- a fused layer must get all its parts: one that did not would be processed with uninitialised
  memory for the missing parts, and its bias (never moved off the device) is written as soon as
  a part arrives. The rollout worker therefore holds back a part until its siblings have come,
  and refuses an update that ends with parts missing before any of them reaches the engine;
- with tied embeddings the LM head shares the embedding's weight but keeps its own packed copy on
  CPU: it is re-packed after the embedding changes.
"""
from __future__ import annotations

import io
import logging
import re
from typing import Iterable, Union

import torch

Bucket = Union[list[tuple[str, torch.Tensor]], bytes]

_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def pack_bucket(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    """Serialise a bucket for an engine in another process (tensors do not cross it as they are)."""
    buffer = io.BytesIO()
    torch.save([(name, t.detach().contiguous()) for name, t in bucket], buffer)
    return buffer.getvalue()


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    if isinstance(bucket, (bytes, bytearray)):
        return torch.load(io.BytesIO(bucket), weights_only=True)
    return list(bucket)


def missing_fused_parts(names: Iterable[str], packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """Names of the fused siblings that did not come with `names` (q_proj without k_proj/v_proj, ...)."""
    names = set(names)
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        if len(parts) < 2:
            continue
        leaf = parts[-2]  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
        for siblings in packed_modules_mapping.values():
            if leaf in siblings and len(siblings) > 1:
                for sibling in siblings:
                    other = ".".join(parts[:-2] + [sibling, parts[-1]])
                    if other not in names and other not in missing:
                        missing.append(other)
    return missing


class WeightUpdateExtension:
    """Mixed into vLLM's Worker: receives named tensors (checkpoint names, e.g. a view's HF names)."""

    def home_rl_seed(self, seed: int) -> None:
        """Reseed the sampler (it draws from the process's global generators)."""
        from vllm.utils.torch_utils import set_random_seed

        set_random_seed(seed)

    def home_rl_get_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the engine's parameters by vLLM name (CPU-packed linear weights read as empty)."""
        params = dict(self.model_runner.get_model().named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"no such engine parameters: {unknown[:5]}; some are: {list(params)[:5]}")
        return {n: params[n].detach().to("cpu", copy=True) for n in names}

    def home_rl_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_home_rl_update_names", None) is not None:
            raise RuntimeError("a weight update is already in progress on this worker")
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._home_rl_update_names = []

    def home_rl_load_bucket(self, bucket: Bucket) -> int:
        """Load one bucket; returns its size in bytes."""
        from vllm.config import set_current_vllm_config

        tensors = unpack_bucket(bucket)
        self._home_rl_update_names.extend(name for name, _ in tensors)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(iter(tensors))
        return sum(t.numel() * t.element_size() for _, t in tensors)

    def home_rl_packed_modules(self) -> dict[str, list[str]]:
        """Which checkpoint tensors the engine fuses into one layer ({"qkv_proj": ["q_proj", ...], ...})."""
        return dict(getattr(self.model_runner.get_model(), "packed_modules_mapping", {}) or {})

    def home_rl_finish_update(self, abort: bool = False) -> dict:
        """Process what was received; every layer that got nothing keeps its tensors.

        abort: drop what incomplete layers buffered (they keep their old weights) instead of
        processing them with uninitialised memory for the parts that never came.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        names = self._home_rl_update_names or []
        self._home_rl_update_names = None
        if abort:
            _drop_pending_loads(model)
        quiet = logging.getLogger(_LAYERWISE_LOGGER)
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Failed to load weights" for every layer we meant to leave alone
        try:
            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(model, self.model_runner.model_config)
        finally:
            quiet.setLevel(level)
        repacked = _repack_tied_lm_heads(model, names)
        return {"tensors": len(names), "repacked_lm_heads": repacked}


def hold_incomplete(tensors: list[tuple[str, torch.Tensor]], packed_modules_mapping: dict[str, list[str]]
                    ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Split into (ready, held): held are fused parts whose siblings are not among `tensors` yet."""
    names = {name for name, _ in tensors}
    ready, held = [], []
    for name, tensor in tensors:
        siblings = missing_fused_parts([name], packed_modules_mapping)
        (held if any(s not in names for s in siblings) else ready).append((name, tensor))
    return ready, held


def _drop_pending_loads(model: torch.nn.Module) -> None:
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    for layer in model.modules():
        info = get_layerwise_info(layer)
        if info.can_load() and info.load_numel:
            info.load_numel = 0
            info.loaded_weights = []


def _repack_tied_lm_heads(model: torch.nn.Module, names: list[str]) -> int:
    """Re-pack LM heads whose weight is an embedding's (tied) after that embedding was reloaded (CPU only)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not any(re.search(r"embed_tokens|wte|word_embeddings", n) for n in names):
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    embeddings = [m for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    repacked = 0
    for head in model.modules():
        if isinstance(head, ParallelLMHead) and any(head.weight is e.weight for e in embeddings):
            dispatch_cpu_unquantized_gemm(head, remove_weight=False)
            repacked += 1
    return repacked
