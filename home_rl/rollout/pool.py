"""RolloutPool: R rollout worker actors that split a batch, and receive every weight update together.

    pool = RolloutPool(view_folder, cfg)                 # Ray already initialised by the caller
    result = pool.generate(prompts, seed=step)           # samples per prompt in input order; stats per worker
    pool.attach(sender)                                  # a home_rl.weights Sender: the learners' rank 0, ...
    pool.sync(version=step)                              # the sender's staged version, straight to every engine
    pool.shutdown()

A batch is split so that every worker gets about the same number of prompts and about the same
amount of work (prompt length plus the responses' budget), then put back in input order.

A worker that dies (node lost, OOM-killed, preempted) is restarted in its placement bundle, the engines join
the sender again and receive the pool's weights version from it (the driver never holds weights), and its share
of the call is issued again with the same seed. Restarts are counted in the stats (`worker_restarts`) and in
`pool.restarts`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import torch

from home_rl.console import actor_env, phase_done
from home_rl.errors import HomeRLError, ray_get
from home_rl.rollout.adapter import ADAPTER_BACKEND
from home_rl.rollout.config import RolloutConfig, check_rollout_config
from home_rl.rollout.inputs import as_vllm_prompt
from home_rl.rollout.types import RolloutResult, Sample
from home_rl.rollout.worker import RolloutWorker, engine_env

log = logging.getLogger(__name__)

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
    """Distinct, reproducible sampler seeds per worker for one generate call (in the 32 bits vLLM takes)."""
    return (seed * 65_537 + rank) % 2**32


class RolloutPool:
    def __init__(self, model_path: str, cfg: RolloutConfig, placement: Any = None, adapter: Optional[str] = None):
        """`placement`: the job's home_rl.cluster.Placement holding the workers' bundles (None: each worker
        asks for rollout.resources wherever Ray finds them). `adapter`: a PEFT adapter folder over `model_path`
        (a LoRA think expert over the fast view) that every request is answered with; new versions of it come
        as tensors (home_rl.weights' `adapter` backend)."""
        check_rollout_config(cfg)
        start = time.perf_counter()
        self.cfg, self.model_path, self.adapter = cfg, str(model_path), adapter
        self.backend = ADAPTER_BACKEND if adapter else cfg.transfer_backend
        self.placement = placement
        self.sender: Any = None  # a home_rl.weights Sender, once attached
        self.version = 0
        self.restarts = 0
        self.workers = [self._start(rank) for rank in range(cfg.num_workers)]
        self.info = ray_get([w.ready.remote() for w in self.workers])
        phase_done("rollout", f"{cfg.num_workers} vLLM worker{'s' * (cfg.num_workers > 1)} ready", start)

    def _start(self, rank: int):
        import ray

        options = self.placement.rollout_options(rank) if self.placement else self.cfg.resources.actor_options()
        actor = ray.remote(RolloutWorker).options(**options,
                                                   runtime_env={"env_vars": {**engine_env(self.cfg), **actor_env()}})
        return actor.remote(self.model_path, self.cfg, rank, self.adapter)

    def _restart(self, rank: int, error: BaseException, refill: bool = True) -> None:
        """Replace dead worker `rank`: a new actor in the same bundle, at the pool's weights version (`refill`
        False: the caller sends a version next)."""
        import ray

        if self.version and self.sender is None:
            raise HomeRLError(f"rollout worker {rank} died after a weight update and the pool has no "
                              f"sender to bring a replacement up to date") from error
        log.warning("rollout worker %d died (%s): restarting it (restart %d)", rank,
                    str(error).splitlines()[0][:200], self.restarts + 1)
        try:
            ray.kill(self.workers[rank])
        except Exception:  # noqa: BLE001  already gone
            pass
        self.workers[rank] = self._start(rank)
        info = ray_get(self.workers[rank].ready.remote())
        if self.sender is not None:  # every engine joins a new group with the sender; the new one gets the weights
            self.sender.connect(self.workers, self.cfg.tensor_parallel_size, self.backend)
            if self.version and refill:
                self.sender.send(self.version)
        self.info[rank] = info
        self.restarts += 1

    def _call(self, rank: int, method: str, *args) -> Any:
        """workers[rank].method(*args), restarting a dead worker and calling again (max_restarts times)."""
        import ray

        for attempt in range(self.cfg.max_restarts + 1):
            try:
                return ray_get(getattr(self.workers[rank], method).remote(*args))
            except ray.exceptions.RayActorError as e:
                if attempt == self.cfg.max_restarts:
                    raise HomeRLError(f"rollout worker {rank} died {attempt + 1} times in one call "
                                      f"(rollout.max_restarts={self.cfg.max_restarts}): {e}") from e
                self._restart(rank, e)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def generate(self, prompts: Sequence[Any], n: Optional[int] = None, sampling: Optional[dict] = None,
                 seed: Optional[int] = None, on_long_prompt: Optional[str] = None) -> RolloutResult:
        """n samples per prompt from all workers; `samples[i]` belongs to `prompts[i]`.

        stats: totals (prompts, samples, generated_tokens, seconds = wall time, tokens_per_s, long/
        truncated/skipped prompts) and `per_worker`: each worker's own counts, seconds and tokens_per_s.
        """
        import ray

        start = time.perf_counter()
        restarts_before = self.restarts
        prompts = [as_vllm_prompt(p) for p in prompts]  # rendered prompts travel as their vLLM input only
        budget = (n or self.cfg.n) * (sampling or {}).get("max_response_tokens", self.cfg.max_response_tokens)
        parts = split_batch([prompt_cost(p, budget) for p in prompts], self.num_workers)
        calls = [(rank, ([prompts[i] for i in idx], n, sampling, None if seed is None else worker_seed(seed, rank),
                         idx, on_long_prompt)) for rank, idx in enumerate(parts) if idx]
        refs = [self.workers[rank].generate.remote(*args) for rank, args in calls]
        used = [parts[rank] for rank, _ in calls]
        results: list[RolloutResult] = []
        for (rank, args), ref in zip(calls, refs):  # all run at once; a dead worker's share runs again
            try:
                results.append(ray_get(ref))
            except ray.exceptions.RayActorError as e:
                self._restart(rank, e)
                results.append(self._call(rank, "generate", *args))
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
                 "weights_version": self.version, "worker_restarts": self.restarts - restarts_before,
                 "per_worker": per_worker}
        return RolloutResult(samples, stats)

    def attach(self, sender: Any) -> None:
        """Connect every engine to `sender` (a home_rl.weights Sender): later versions come from it directly."""
        self.sender = sender
        sender.connect(self.workers, self.cfg.tensor_parallel_size, self.backend)

    def sync(self, version: int) -> dict:
        """Every engine loads the sender's staged `version` (the changed tensors of the served view). If a worker
        dies meanwhile, it is restarted and the version is sent again."""
        import ray

        if self.sender is None:
            raise RuntimeError("RolloutPool.sync before attach: no sender holds the weights")
        start = time.perf_counter()
        try:
            report = self.sender.send(version)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            dead = self._dead_ranks()
            if not dead:
                raise
            for rank in dead:  # each restart joins every engine to a new group
                self._restart(rank, e, refill=False)
            report = self.sender.send(version)
        self.version = int(version)
        return {**report, "version": self.version, "seconds": time.perf_counter() - start}

    def _dead_ranks(self) -> list[int]:
        import ray

        dead = []
        for rank, worker in enumerate(self.workers):
            try:
                ray.get(worker.ready.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(rank)
        return dead

    def reset_caches(self) -> None:
        """Every worker's prefix and encoder caches dropped (RolloutWorker.reset_caches)."""
        ray_get([w.reset_caches.remote() for w in self.workers])

    def sleep(self) -> None:
        """Free the engines' GPU memory for a colocated update (a no-op where the build cannot sleep)."""
        ray_get([w.sleep.remote() for w in self.workers])

    def wake_up(self) -> None:
        ray_get([w.wake_up.remote() for w in self.workers])

    def engine_tensors(self, names: Sequence[str], rank: int = 0) -> dict[str, torch.Tensor]:
        return ray_get(self.workers[rank].engine_tensors.remote(list(names)))

    def shutdown(self) -> None:
        import ray

        try:  # let each engine stop its own processes (multiprocess engines), then end the actors
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001  a dead or stuck worker is killed below all the same
            pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []

