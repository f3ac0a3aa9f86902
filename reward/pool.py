"""The reward worker pool: Ray actors that score batches in parallel and keep the input order.

    pool = RewardPool(cfg)                   # Ray already initialised by the caller
    results, metrics = pool.score(samples)   # samples: [{id, response, ground_truth, data_source, extra_info}]
    pool.shutdown()

Each actor owns a sandbox process (reward/sandbox.py) that runs the verifier calls: a call that
overruns `timeout_s` is killed there and its sample scores 0, an exception scores 0, and both are
counted per verifier in the metrics; the first failure of each kind and verifier is logged with
the sample id and the error. A verifier can therefore neither stop training nor fail unseen.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter

from home_rl.console import actor_env, capture_output, phase_done
from home_rl.errors import ConfigError, ray_get
from reward.config import RewardConfig, check_reward_config, validate_sources
from reward.registry import absolute_spec, get_verifier, is_batched, is_user_registered
from reward.sandbox import Sandbox
from reward.scoring import assemble, clean_sample, plan_calls, summarize

logger = logging.getLogger(__name__)


class RewardWorker:
    """One reward actor: plans a chunk's verifier calls, runs them in its sandbox, assembles results."""

    def __init__(self, cfg: RewardConfig, setup: dict, rank: int = 0):
        capture_output(f"reward-{rank}")  # first: the sandbox process inherits the log file as its stdout/stderr
        self.cfg = cfg
        self.batched = {spec: ref["batched"] for spec, ref in setup["verifiers"].items()}
        self.sandbox = Sandbox(setup)

    def ready(self) -> bool:
        return True

    def score(self, samples: list[dict]) -> list[dict]:
        calls, owners = plan_calls(samples, self.cfg, self.batched)
        outcomes = self.sandbox.run(calls, self.cfg.timeout_s)
        return assemble(samples, self.cfg, calls, owners, outcomes)

    def close(self) -> None:
        self.sandbox.close()


class RewardPool:
    """`cfg.num_workers` reward actors; `score` splits a batch into one contiguous chunk per actor."""

    def __init__(self, cfg: RewardConfig):
        import ray

        check_reward_config(cfg)
        # Absolute file paths: the actors may run in another folder or on another node.
        sources = {source: [dataclasses.replace(e, name=absolute_spec(e.name)) for e in entries]
                   for source, entries in cfg.sources.items()}
        self.cfg = dataclasses.replace(cfg, sources=sources)
        setup = {"sys_path": list(sys.path), "verifiers": _verifier_refs(self.cfg)}
        start = time.perf_counter()
        worker = ray.remote(RewardWorker).options(**cfg.resources.actor_options(), runtime_env={"env_vars": actor_env()})
        self.workers = [worker.remote(self.cfg, setup, rank) for rank in range(cfg.num_workers)]
        ray_get([w.ready.remote() for w in self.workers])  # a sandbox that cannot start fails here, not mid-run
        phase_done("reward", f"{cfg.num_workers} worker{'s' * (cfg.num_workers > 1)} ready", start)
        self.failure_totals: Counter = Counter()
        self._logged: set[tuple[str, str]] = set()

    def validate_sources(self, data_sources) -> None:
        """Start-up check of a data set's sources against this pool's config (ConfigError names them)."""
        validate_sources(self.cfg, data_sources)

    def score(self, samples: list[dict]) -> tuple[list[dict], dict[str, float]]:
        """Score `samples` in parallel; results come back in the order of `samples`."""
        start = time.perf_counter()
        cleaned = [clean_sample(s, i) for i, s in enumerate(samples)]
        validate_sources(self.cfg, {s["data_source"] for s in cleaned})
        chunks = _split(cleaned, len(self.workers))
        refs = [w.score.remote(chunk) for w, chunk in zip(self.workers, chunks) if chunk]
        results = [r for chunk_results in ray_get(refs) for r in chunk_results]
        self._count_failures(results)
        metrics = summarize(results) if results else {}
        metrics["reward/samples_per_s"] = len(results) / max(time.perf_counter() - start, 1e-9)
        return results, metrics

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.get(w.close.remote(), timeout=30)
            except Exception:  # the actor is already gone: its sandboxes died with it
                pass
            ray.kill(w)
        self.workers = []

    def _count_failures(self, results: list[dict]) -> None:
        for r in results:
            for label, error in r.get("error", {}).items():
                key = (label, error["kind"])
                self.failure_totals[key] += 1
                if key not in self._logged:
                    self._logged.add(key)
                    logger.warning("reward verifier %r: first %s, on sample id=%r (data_source %r): %s "
                                   "(the sample scores 0; later ones are only counted in reward/failures/*)",
                                   label, error["kind"], r["id"], r["data_source"], error["message"])


def _verifier_refs(cfg: RewardConfig) -> dict[str, dict]:
    """What a sandbox needs to get each verifier: its spec, or the function itself when the name was
    registered by the caller's code (the sandbox never ran that code), plus options and batch form."""
    import cloudpickle

    refs = {}
    for source, entries in cfg.sources.items():
        for entry in entries:
            if entry.name in refs:
                continue
            try:
                fn = get_verifier(entry.name)
            except ConfigError as e:
                raise ConfigError(f"reward.sources.{source}: {e}") from None
            refs[entry.name] = {
                "spec": entry.name,
                "pickled": cloudpickle.dumps(fn) if is_user_registered(entry.name) else None,
                "options": cfg.verifier_options(entry.name),
                "batched": is_batched(fn),
            }
    return refs


def _split(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous chunks of near-equal size (the order is kept)."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks

