"""RolloutPool: R rollout worker actors that split a batch, and receive every weight update together.

    pool = RolloutPool(view_folder, cfg)                 # Ray already initialised by the caller
    result = pool.generate(prompts, seed=step)           # samples per prompt in input order; stats per worker
    pool.update_weights(named_tensors, version=step)     # buckets: ray.put once, every worker loads it
    pool.shutdown()

A batch is split so that every worker gets about the same number of prompts and about the same
amount of work (prompt length plus the responses' budget), then put back in input order.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional, Sequence

import torch

from home_rl.errors import HomeRLError
from home_rl.rollout.config import RolloutConfig, check_rollout_config
from home_rl.rollout.inputs import as_vllm_prompt
from home_rl.rollout.types import RolloutResult, Sample
from home_rl.rollout.worker import RolloutWorker, engine_env, iter_buckets

CHARS_PER_TOKEN = 4  # rough size of a text prompt before tokenisation (balancing only)
TOKENS_PER_IMAGE = 256  # rough size of an image in prompt tokens (balancing only)


def prompt_cost(p: Any, response_budget: int) -> float:
    """Estimated work of one prompt (a vLLM input dict): its tokens plus the tokens its samples may generate."""
    if not isinstance(p, dict):
        return float(response_budget)
    if "prompt_token_ids" in p:
        tokens = len(p["prompt_token_ids"])
    else:
        tokens = len(str(p.get("prompt", ""))) / CHARS_PER_TOKEN
    images = (p.get("multi_modal_data") or {}).get("image", []) if isinstance(p.get("multi_modal_data"), dict) else []
    images = images if isinstance(images, (list, tuple)) else [images]
    return tokens + TOKENS_PER_IMAGE * len(images) + response_budget


def split_batch(costs: Sequence[float], num_workers: int) -> list[list[int]]:
    """Assign prompt indices to workers: at most ceil(N/R) prompts each, costliest first to the least loaded.

    Each worker's indices come out sorted, so a worker sees its prompts in input order.
    """
    cap = math.ceil(len(costs) / num_workers) if costs else 0
    loads = [0.0] * num_workers
    parts: list[list[int]] = [[] for _ in range(num_workers)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        open_workers = [w for w in range(num_workers) if len(parts[w]) < cap]
        w = min(open_workers, key=lambda w: (loads[w], len(parts[w]), w))
        parts[w].append(i)
        loads[w] += costs[i]
    return [sorted(p) for p in parts]


def worker_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible sampler seeds per worker for one generate call."""
    return seed * 65_537 + rank


class RolloutPool:
    def __init__(self, model_path: str, cfg: RolloutConfig):
        import ray

        check_rollout_config(cfg)
        self.cfg, self.model_path = cfg, str(model_path)
        actor = ray.remote(RolloutWorker).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
            runtime_env={"env_vars": engine_env(cfg)})
        self.workers = [actor.remote(self.model_path, cfg, rank) for rank in range(cfg.num_workers)]
        self.info = _get([w.ready.remote() for w in self.workers])
        self.version = 0

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def generate(self, prompts: Sequence[Any], n: Optional[int] = None, sampling: Optional[dict] = None,
                 seed: Optional[int] = None, on_long_prompt: Optional[str] = None) -> RolloutResult:
        """n samples per prompt from all workers; `samples[i]` belongs to `prompts[i]`.

        stats: totals (prompts, samples, generated_tokens, seconds = wall time, tokens_per_s, long/
        truncated/skipped prompts) and `per_worker`: each worker's own counts, seconds and tokens_per_s.
        """
        start = time.perf_counter()
        prompts = [as_vllm_prompt(p) for p in prompts]  # rendered prompts travel as their vLLM input only
        budget = (n or self.cfg.n) * (sampling or {}).get("max_response_tokens", self.cfg.max_response_tokens)
        parts = split_batch([prompt_cost(p, budget) for p in prompts], self.num_workers)
        refs, used = [], []
        for rank, (worker, idx) in enumerate(zip(self.workers, parts)):
            if idx:
                refs.append(worker.generate.remote([prompts[i] for i in idx], n, sampling,
                                                   None if seed is None else worker_seed(seed, rank), idx, on_long_prompt))
                used.append(idx)
        results: list[RolloutResult] = _get(refs)
        samples: list[list[Sample]] = [[] for _ in prompts]
        for idx, result in zip(used, results):
            for i, group in zip(idx, result.samples):
                samples[i] = group
        wall = time.perf_counter() - start
        per_worker = [r.stats for r in results]
        total = lambda key: sum(s[key] for s in per_worker)  # noqa: E731
        generated = total("generated_tokens")
        stats = {"prompts": len(prompts), "samples": total("samples"), "generated_tokens": generated,
                 "prompt_tokens": total("prompt_tokens"), "seconds": wall, "tokens_per_s": generated / max(wall, 1e-9),
                 "cpu_seconds": total("cpu_seconds"),
                 "long_prompts": total("long_prompts"), "truncated_prompts": total("truncated_prompts"),
                 "skipped_prompts": total("skipped_prompts"), "finish_length": total("finish_length"),
                 "weights_version": self.version, "per_worker": per_worker}
        return RolloutResult(samples, stats)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                       bucket_mb: Optional[float] = None) -> dict:
        """Send changed tensors (names of the served view) to every worker, one bucket at a time.

        Each bucket is put in Ray's object store once and loaded by all workers; the next bucket is
        put while the workers load the current one, so at most two buckets are in flight.
        """
        import ray

        start = time.perf_counter()
        _get([w.begin_weight_update.remote() for w in self.workers])
        pending: list = []
        nbytes = tensors = buckets = 0
        try:
            for bucket in iter_buckets(named_tensors, bucket_mb or self.cfg.update_bucket_mb):
                ref = ray.put(bucket)
                tensors += len(bucket)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                buckets += 1
                del bucket
                _get(pending)
                pending = [w.load_weight_bucket.remote(ref) for w in self.workers]
                del ref  # the workers' tasks keep it alive until they have loaded it
            _get(pending)
        except BaseException:
            ray.get([w.abort_weight_update.remote() for w in self.workers])
            raise
        reports = _get([w.finish_weight_update.remote(version) for w in self.workers])
        self.version = int(version)
        return {"version": self.version, "tensors": tensors, "bytes": nbytes, "buckets": buckets,
                "seconds": time.perf_counter() - start, "repacked_lm_heads": reports[0]["repacked_lm_heads"]}

    def engine_tensors(self, names: Sequence[str], rank: int = 0) -> dict[str, torch.Tensor]:
        return _get(self.workers[rank].engine_tensors.remote(list(names)))

    def shutdown(self) -> None:
        import ray

        try:  # let each engine stop its own processes (multiprocess engines), then end the actors
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001  a dead or stuck worker is killed below all the same
            pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def _get(refs):
    """ray.get that re-raises a worker's user-facing error (bad prompt, bad weights) as itself."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, HomeRLError):
            raise cause from None
        raise
