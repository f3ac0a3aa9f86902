"""Every vLLM name home-rl uses beyond the `vllm` package's top level (LLM, SamplingParams, AsyncEngineArgs).

    from home_rl import vllm_names as vn
    vn.initialize_layerwise_reload(model)

Names are imported on first use, so importing this module costs nothing. `WEIGHT_TRANSFER` is vLLM's public RL
weight-sync API (`vllm.distributed.weight_transfer`, `vllm.config.weight_transfer`). `INTERNAL` are not public
API: they were checked against vLLM `CHECKED_AGAINST`, and a run under another version says so once. Breakage from
vLLM internals is what RL users report most; keeping the list here keeps it short and in sight.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, Iterator

log = logging.getLogger(__name__)

CHECKED_AGAINST = "0.31.0"

WEIGHT_TRANSFER = {
    name: "vllm.distributed.weight_transfer.base"
    for name in ("WeightTransferEngine", "TrainerWeightTransferEngine", "WeightSource", "ParamMeta",
                 "WeightTransferInitInfo", "TrainerInitInfo", "WeightTransferUpdateInfo", "layerwise_groups")
} | {
    "WeightTransferEngineFactory": "vllm.distributed.weight_transfer.factory",
    "WeightTransferTrainerFactory": "vllm.distributed.weight_transfer.factory",
    "NCCLTrainerInitInfo": "vllm.distributed.weight_transfer.nccl_engine",
    "WeightTransferConfig": "vllm.config.weight_transfer",
}

INTERNAL = {
    # the layerwise reload session the engines' weight-transfer backends run (vLLM's nccl backend does the same)
    "initialize_layerwise_reload": "vllm.model_executor.model_loader.reload",
    "finalize_layerwise_reload": "vllm.model_executor.model_loader.reload",
    "get_layerwise_info": "vllm.model_executor.model_loader.reload.layerwise",  # an abandoned round's buffers
    # the CPU build's packed copy of a tied LM head (re-packed after its embedding is reloaded)
    "VocabParallelEmbedding": "vllm.model_executor.layers.vocab_parallel_embedding",
    "ParallelLMHead": "vllm.model_executor.layers.vocab_parallel_embedding",
    "dispatch_cpu_unquantized_gemm": "vllm.model_executor.layers.utils",
    # the platform (CPU or CUDA build, sleep mode), the sampler's seed, errors and the serving engine
    "current_platform": "vllm.platforms",
    "set_random_seed": "vllm.utils.torch_utils",
    "VLLMValidationError": "vllm.exceptions",
    "AsyncLLM": "vllm.v1.engine.async_llm",
    "RequestOutputKind": "vllm.sampling_params",
    "LoRARequest": "vllm.lora.request",  # the adapter a request is answered with (a LoRA think expert)
}
LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # logs each layer a reload left alone

_warned = False


def __getattr__(name: str) -> Any:
    module = WEIGHT_TRANSFER.get(name) or INTERNAL.get(name)
    if module is None:
        raise AttributeError(f"{name!r} is not among the vLLM names home-rl uses (home_rl/vllm_names.py)")
    if name in INTERNAL:
        _check_version()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def _check_version() -> None:
    global _warned
    import vllm

    if not _warned and vllm.__version__ != CHECKED_AGAINST:
        _warned = True
        log.warning("vLLM %s: home-rl's use of vLLM internals was checked against %s (home_rl/vllm_names.py)",
                    vllm.__version__, CHECKED_AGAINST)


def is_cpu() -> bool:
    return __getattr__("current_platform").is_cpu()


def repack_cpu_linear(layer: Any) -> None:
    """Re-pack a layer's weight for the CPU build's GEMM (it keeps a packed copy of its own)."""
    __getattr__("dispatch_cpu_unquantized_gemm")(layer, remove_weight=False)


@contextlib.contextmanager
def quiet_layerwise_reload() -> Iterator[None]:
    """Silence the "Failed to load weights" line vLLM logs for every layer a reload did not touch."""
    logger = logging.getLogger(LAYERWISE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
