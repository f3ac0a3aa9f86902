"""RolloutWorker: one vLLM engine over an expert view, run as a Ray actor (or in-process in a script).

    worker = RolloutWorker(view_folder, cfg, rank=0)
    result = worker.generate(prompts, n=8)                # RolloutResult: samples per prompt, in input order
    sender.connect([worker_actor]); sender.send(3)       # new weights: vLLM's weight-transfer API (home_rl.weights)

The same code drives vLLM's CPU build (engine inside this process, CPU threads and KV-cache GiB
from the config) and its CUDA build (tensor_parallel_size, gpu_memory_utilization); only the
config differs. Sampling is seeded per engine (seed + rank) and may be reseeded per call: a
per-request `SamplingParams(seed=...)` crashes on the CPU build ("CPU Generator does not use offset").
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

import torch

from home_rl.console import capture_output
from home_rl.errors import ModelError
from home_rl.resources import bf16_supported
from home_rl.rollout.adapter import EngineAdapter
from home_rl.rollout.config import RolloutConfig, check_rollout_config
from home_rl.rollout.inputs import RolloutInputError, describe, prepare_prompt
from home_rl.rollout.types import RolloutResult, Sample

log = logging.getLogger(__name__)

EXTENSION = "home_rl.rollout.engine_ext.WorkerExtension"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_response_tokens", "stop")


def threads_per_worker(cfg: RolloutConfig) -> int:
    return cfg.resources.num_threads(default=max(1, (os.cpu_count() or 1) // cfg.num_workers))


def engine_env(cfg: RolloutConfig) -> dict[str, str]:
    """Environment a worker process needs before vLLM is imported (also passed to Ray as runtime_env)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if cfg.in_process_engine else "1",
           "OMP_NUM_THREADS": str(threads_per_worker(cfg)),  # vLLM drops an in-process engine to 1 thread without it
           "TOKENIZERS_PARALLELISM": "false"}
    if cfg.cpu_threads_bind or cfg.resources.cores:  # vLLM binds its threads itself: to the pinned cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind or cfg.resources.cores
    return env


class RolloutWorker:
    def __init__(self, model_path: str, cfg: RolloutConfig, rank: int = 0, adapter: Optional[str] = None):
        capture_output(f"rollout-{rank}")  # first: vLLM's output goes to the run's logs/ (a no-op in-process)
        check_rollout_config(cfg)
        cfg.resources.pin()  # before the engine starts its threads
        os.environ.update(engine_env(cfg))
        if cfg.kv_cache_gib > 0:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the config's size wins over a stray environment
        torch.set_num_threads(threads_per_worker(cfg))
        import transformers
        from vllm import LLM

        from home_rl import vllm_names as vn
        from home_rl.weights import gloo

        gloo.register()  # the CPU backend of vLLM's weight-transfer API, in this process (an in-process engine's)

        self.cfg, self.rank, self.model_path = cfg, rank, str(model_path)
        # A LoRA think expert: the engine holds the fast view and answers every request with the adapter.
        self.adapter = EngineAdapter(adapter, rank) if adapter else None
        # vLLM's sleep mode needs its CUDA memory allocator; the CPU build has nothing to free
        self.can_sleep = cfg.sleep_during_updates and vn.current_platform.is_sleep_mode_available()
        self.version = 0
        self.dtype = engine_dtype(cfg.dtype, "the rollout engine")
        hf_config = transformers.AutoConfig.from_pretrained(self.model_path)
        multimodal = hasattr(hf_config, "vision_config")
        start = time.perf_counter()
        self.llm = LLM(
            model=self.model_path,
            dtype=self.dtype,
            seed=cfg.seed + rank,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_num_seqs=cfg.max_num_seqs,
            logprobs_mode=cfg.logprobs_mode,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30) if cfg.kv_cache_gib > 0 else None,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls=EXTENSION,
            limit_mm_per_prompt={"image": cfg.limit_images_per_prompt} if multimodal else None,
            enable_sleep_mode=self.can_sleep,
            weight_transfer_config=vn.WeightTransferConfig(backend=cfg.transfer_backend),
            **(self.adapter.engine_args if self.adapter else {}),
        )
        self.asleep = False
        self.updating = False  # a weight update round is open (start_weight_update without its finish)
        self.start_s = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.image_token_id = _image_token_id(hf_config) if multimodal else None
        self.placeholder_bias = placeholder_bias(hf_config) if multimodal else {}

    def ready(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "version": self.version, "start_s": self.start_s,
                "threads": threads_per_worker(self.cfg), "model": self.model_path}

    # ------------------------------------------------------------------ generation

    def sampling_params(self, n: Optional[int] = None, sampling: Optional[dict] = None):
        """vLLM SamplingParams from the config, with per-call overrides (keys of SAMPLING_KEYS)."""
        from vllm import SamplingParams

        sampling = dict(sampling or {})
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise RolloutInputError(f"unknown sampling override(s) {sorted(unknown)}; allowed: {', '.join(SAMPLING_KEYS)}")
        get = lambda key: sampling.get(key, getattr(self.cfg, key))  # noqa: E731
        return SamplingParams(
            n=n or self.cfg.n,
            temperature=get("temperature"),
            top_p=get("top_p"),
            top_k=get("top_k"),
            max_tokens=get("max_response_tokens"),
            stop=list(get("stop")),
            include_stop_str_in_output=True,  # the text ends with "</answer>", as the tokens do
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,  # a few lists per sample instead of a dict per token
            logit_bias=self.placeholder_bias or None,
        )

    def generate(self, prompts: Sequence[Any], n: Optional[int] = None, sampling: Optional[dict] = None,
                 seed: Optional[int] = None, indices: Optional[Sequence[int]] = None,
                 on_long_prompt: Optional[str] = None) -> RolloutResult:
        """Generate n samples per prompt. Results come back per prompt, in input order.

        seed: reseed the engine's sampler first (the same seed, prompts and weights give the same samples).
        indices: the prompts' positions in a larger batch (the pool passes them), used in Sample.prompt_index
        and error messages.
        on_long_prompt: overrides rollout.on_long_prompt for this call (error | truncate | skip).
        """
        from home_rl.vllm_names import VLLMValidationError

        start, cpu_start = time.perf_counter(), time.process_time()
        indices = list(indices) if indices is not None else list(range(len(prompts)))
        params = self.sampling_params(n, sampling)
        policy = on_long_prompt or self.cfg.on_long_prompt
        if policy not in RolloutConfig.CHOICES["on_long_prompt"]:
            raise RolloutInputError(f"on_long_prompt must be one of {RolloutConfig.CHOICES['on_long_prompt']}, got {policy!r}")
        prepared = [prepare_prompt(i, p, self.tokenizer, self.image_token_id, self.cfg.max_prompt_tokens, policy)
                    for i, p in zip(indices, prompts)]
        if seed is not None:
            self.llm.collective_rpc("home_rl_seed", args=(seed,))
        request_of: dict[str, int] = {}
        try:
            for k, p in enumerate(prepared):
                if p.engine_input is None:
                    continue
                try:
                    (request_id,) = self.llm.enqueue([p.engine_input], params, use_tqdm=False,
                                                     lora_request=self.adapter.request if self.adapter else None)
                except VLLMValidationError as e:  # e.g. images made the prompt longer than the context
                    if policy != "skip":
                        raise RolloutInputError(f"{describe(p.index, p.row_id)}: {e}") from None
                    p.too_long, p.engine_input = True, None
                    continue
                request_of[request_id] = k
            by_output_id = {rid.split("-")[0]: k for rid, k in request_of.items()}  # outputs carry the counter part only
            outputs = self.llm.wait_for_completion(use_tqdm=False) if request_of else []
        except BaseException:
            if request_of:
                self.llm.llm_engine.abort_request(list(request_of), internal=True)
            raise

        samples: list[list[Sample]] = [[] for _ in prepared]
        for out in outputs:
            k = by_output_id[out.request_id]
            samples[k] = [self._sample(prepared[k], out, c) for c in sorted(out.outputs, key=lambda c: c.index)]
        seconds = time.perf_counter() - start
        generated = sum(len(s.response_ids) for group in samples for s in group)
        stats = {
            "worker": self.rank, "prompts": len(prepared), "samples": sum(map(len, samples)),
            "prompt_tokens": sum(len(g[0].prompt_ids) for g in samples if g),
            "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / max(seconds, 1e-9),
            "cpu_seconds": time.process_time() - cpu_start,  # all threads of this process (an in-process engine's included)
            "long_prompts": sum(p.too_long for p in prepared), "truncated_prompts": sum(p.truncated for p in prepared),
            "skipped_prompts": sum(p.engine_input is None for p in prepared),
            "finish_length": sum(s.finish_reason == "length" for g in samples for s in g),
            "weights_version": self.version,
        }
        return RolloutResult(samples, stats)

    def _sample(self, prompt, out, completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = completion.logprobs
        if hasattr(logprobs, "start_indices"):  # FlatLogprobs: the sampled token sits first at each position
            values = [logprobs.logprobs[i] for i in logprobs.start_indices]
        else:
            values = [logprobs[pos][tok].logprob for pos, tok in enumerate(ids)]
        if len(values) != len(ids):
            raise RuntimeError(f"vLLM returned {len(values)} log-probs for {len(ids)} tokens")
        return Sample(prompt_index=prompt.index, sample_index=completion.index, prompt_ids=list(out.prompt_token_ids),
                      response_ids=ids, logprobs=values, text=completion.text,
                      finish_reason=completion.finish_reason or "abort", stop_reason=completion.stop_reason,
                      weights_version=self.version, worker=self.rank, prompt_truncated=prompt.truncated,
                      row_id=prompt.row_id)

    # ------------------------------------------------------------------ weights

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Join a sender's group (vLLM's weight-transfer API; home_rl.weights): a new one replaces the last."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.wake_up()  # the weights must be resident to be overwritten
        if self.updating:  # a sender that failed mid-round (another engine died) left this one's round open
            log.warning("rollout worker %d: the last weight update never finished: closed now", self.rank)
            self.llm.finish_weight_update()  # layers it did not complete keep their weights
        self.llm.start_weight_update()
        self.updating = True

    def update_weights(self, update_info: dict) -> None:
        """Receive a round from the sender (blocks until it has broadcast every bucket)."""
        try:
            self.llm.update_weights({"update_info": update_info})
        except BaseException as e:
            self.updating = False  # the engine abandoned the round itself
            raise ModelError(f"rollout worker {self.rank}: the update was abandoned and the weights stay at version "
                             f"{self.version} (layers it completed keep their new weights): {type(e).__name__}: {e}"
                             ) from e

    def finish_weight_update(self, version: int) -> None:
        """Process what was received, forget the prompts computed with the old weights, adopt `version`."""
        self.llm.finish_weight_update()
        self.updating = False
        self._reset_caches()
        self.version = int(version)

    def load_adapter(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """New adapter tensors (by the view's names) as weights `version`: loaded in place of the last ones."""
        if self.adapter is None:
            raise ModelError(f"rollout worker {self.rank} serves no adapter: its weights come through "
                             "init/start/update/finish_weight_update")
        self.wake_up()
        self.llm.llm_engine.add_lora(self.adapter.write(tensors, version))
        self._reset_caches()  # the prefix cache keys on the adapter's id, which stays the same
        self.version = int(version)

    def reset_caches(self) -> None:
        """Forget the prompts computed so far, as a fresh engine: later samples do not depend on what ran before
        (a prompt prefix found in the cache is computed another way, and can round differently)."""
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Drop what was computed with the old weights: prompts' KV blocks and images' encoder outputs."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()  # scheduler's bookkeeping and the runner's storage together

    def engine_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of the engine's own parameters (vLLM names, e.g. model.norm.weight): for checks and debugging."""
        return self.llm.collective_rpc("home_rl_get_tensors", args=(list(names),))[0]

    def sleep(self) -> None:
        """Level 1: weights to host memory, KV cache dropped (the next wake_up restores the weights)."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            self._reset_caches()

    def shutdown(self) -> None:
        if self.adapter is not None:
            self.adapter.cleanup()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def engine_dtype(dtype: str, who: str) -> str:
    """The dtype a vLLM engine runs in: `dtype`, but float32 for bfloat16 on a CPU that only emulates it (warned)."""
    from home_rl import vllm_names as vn

    if dtype == "bfloat16" and vn.is_cpu() and not bf16_supported(torch.device("cpu")):
        log.warning("bfloat16 is not supported on this cpu: %s runs in float32", who)
        return "float32"
    return dtype


def placeholder_bias(hf_config) -> dict[int, float]:
    """Logit bias that keeps a vision-language model from sampling its image and video placeholders: the learner's
    forward would take one for a picture with no pixels ("image features and image tokens do not match"), and a
    served answer has no use for one."""
    ids = (_image_token_id(hf_config), getattr(hf_config, "video_token_id", None))
    return {int(t): -100.0 for t in ids if t is not None}


def _image_token_id(hf_config) -> Optional[int]:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(hf_config, key, None)
        if value is not None:
            return int(value)
    raise ModelError(f"{type(hf_config).__name__} names no image token (image_token_id): cannot check image prompts")
