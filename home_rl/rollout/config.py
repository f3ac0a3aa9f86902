"""The `rollout` config section: how many vLLM workers, how they sample, and what they may use.

    rollout:
      num_workers: 2
      n: 8
      temperature: 1.0
      max_response_tokens: 128

The same fields serve vLLM's CPU build (this machine: threads, KV-cache GiB) and its CUDA build
on clusters (tensor_parallel_size, gpu_memory_utilization, resources.gpus); fields that do not
apply to the platform at hand are ignored by it.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, List

from home_rl.errors import ConfigError
from home_rl.resources import Resources, resources_field


@dataclasses.dataclass
class RolloutConfig:
    num_workers: int = 1  # rollout worker actors (R), each holding one vLLM engine; a batch is split across them
    n: int = 8  # samples generated per prompt (the GRPO group size)
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling: keep the smallest token set with this much probability (1.0: off)
    top_k: int = -1  # keep only the k most likely tokens (-1: off)
    max_response_tokens: int = 128  # a response stops after this many generated tokens (finish_reason "length")
    stop: List[str] = dataclasses.field(default_factory=lambda: ["</answer>"])  # a response also stops after any of these strings (kept in the output)
    max_model_len: int = 2048  # context of the engine (prompt + response tokens); prompts may use max_model_len - max_response_tokens (unset: lowered to the model's context where that is less)
    on_long_prompt: str = "error"  # a prompt longer than max_model_len - max_response_tokens: error | truncate (keep its last tokens; text-only prompts) | skip (no samples); counted in the stats
    dtype: str = "bfloat16"  # dtype of the engine's weights and activations: float32 | bfloat16 | float16
    logprobs_mode: str = "processed_logprobs"  # processed_logprobs: of the distribution sampled from (after temperature/top-k/top-p: what the learner recomputes at the rollout's temperature) | raw_logprobs: of the unmodified distribution (temperature 1)
    seed: int = 0  # engine seed of worker r is seed + r; a generate call given a seed reseeds every worker from it
    enforce_eager: bool = True  # skip torch.compile / CUDA graphs: start-up in seconds instead of a minute or more
    enable_prefix_caching: bool = True  # share the KV cache of a prompt's n samples (reset after every weight update)
    max_num_seqs: int = 256  # most sequences one engine step batches together
    kv_cache_gib: float = 2.0  # KV-cache memory per worker in GiB (CPU build: VLLM_CPU_KVCACHE_SPACE; also caps it on GPUs), 0: let vLLM size it
    cpu_threads_bind: str = ""  # CPU build, multiprocess engine only: VLLM_CPU_OMP_THREADS_BIND (e.g. "0-3", "auto"; "": vLLM's default)
    gpu_memory_utilization: float = 0.85  # CUDA build: fraction of GPU memory vLLM may take (weights + KV cache)
    tensor_parallel_size: int = 1  # CUDA build: GPUs one engine shards the model over
    in_process_engine: bool = True  # run the engine inside the actor (VLLM_ENABLE_V1_MULTIPROCESSING=0); false: vLLM's own engine process (needed for tensor_parallel_size > 1)
    limit_images_per_prompt: int = 4  # most images one prompt may carry (vLLM sizes its multimodal buffers by it)
    weight_transfer: str = "auto"  # backend of vLLM's weight-transfer API that brings new weights to the engines: gloo (host memory, any engine) | nccl (GPU to GPU) | auto: nccl where workers have GPUs of their own, else gloo
    lora_engine: str = "auto"  # how the engines run a LoRA think expert: adapter (the fast view, the adapter on every request; the adapter's tensors sync) | merged (the merged think view; its projections sync) | auto: adapter where workers have GPUs, merged on CPUs (vLLM's CPU LoRA path generated 5.5x slower than the merged view: benchmarks/lora_engine.py)
    resources: Resources = resources_field()  # what each worker actor asks Ray for (gpus: tensor_parallel_size on GPU clusters; threads 0: the machine's cores / num_workers)
    sleep_during_updates: bool = False  # CUDA build: offload the engine's weights and drop its KV cache while learners update (set by cluster.mode=colocated)
    max_restarts: int = 3  # a worker that dies is restarted and its share re-issued, at most this many times per call

    CHOICES: ClassVar[dict] = {
        "on_long_prompt": ("error", "truncate", "skip"),
        "dtype": ("float32", "bfloat16", "float16"),
        "logprobs_mode": ("raw_logprobs", "processed_logprobs"),
        "weight_transfer": ("auto", "gloo", "nccl"),
        "lora_engine": ("auto", "adapter", "merged"),
    }

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt that leaves room for a whole response in the engine's context."""
        return self.max_model_len - self.max_response_tokens

    @property
    def transfer_backend(self) -> str:
        """`weight_transfer` with auto decided: nccl where the workers have GPUs of their own, else gloo (a colocated
        engine shares its GPU with a learner, and one NCCL group cannot hold two ranks on one GPU)."""
        if self.weight_transfer != "auto":
            return self.weight_transfer
        return "nccl" if self.resources.gpus > 0 and not self.sleep_during_updates else "gloo"


    @property
    def serves_adapter(self) -> bool:
        """`lora_engine` with auto decided: a LoRA think expert runs as an adapter in the engines where they have GPUs."""
        return self.lora_engine == "adapter" or (self.lora_engine == "auto" and self.resources.gpus > 0)


def check_rollout_config(cfg: RolloutConfig) -> None:
    """Raise ConfigError for values that cannot work (names the key)."""
    for key, choices in RolloutConfig.CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"rollout.{key} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")
    positive = ("num_workers", "n", "max_response_tokens", "max_model_len", "max_num_seqs",
                "tensor_parallel_size", "limit_images_per_prompt")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"rollout.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.max_prompt_tokens < 1:
        raise ConfigError(f"rollout.max_model_len ({cfg.max_model_len}) must exceed rollout.max_response_tokens "
                          f"({cfg.max_response_tokens}) to leave room for a prompt")
    if cfg.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k == 0 or cfg.top_k < -1:
        raise ConfigError(f"rollout.top_k must be -1 (off) or at least 1, got {cfg.top_k}")
    if cfg.max_restarts < 0:
        raise ConfigError(f"rollout.max_restarts must be >= 0, got {cfg.max_restarts}")
    if cfg.kv_cache_gib < 0:
        raise ConfigError("rollout.kv_cache_gib must be >= 0")
    if cfg.tensor_parallel_size > 1 and cfg.in_process_engine:
        raise ConfigError("rollout.tensor_parallel_size > 1 needs rollout.in_process_engine=false "
                          "(the engine then runs its own worker processes)")
