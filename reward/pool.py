"""The reward worker pool: Ray actors that score batches in parallel and keep the input order.

    pool = RewardPool(cfg)                   # Ray already initialised by the caller; calling styles read here
    pool.check(rows)                         # start-up: sources mapped, every verifier probed on a real row
    results, metrics = pool.score(samples)   # samples: [{id, response, ground_truth, data_source, extra_info, ...}]
    pool.shutdown()

Each actor owns a sandbox process (reward/sandbox.py) that runs the verifier calls: a call that
overruns `timeout_s` is killed there and its sample scores 0, an exception scores 0, and both are
counted per data source and verifier entry in the metrics. Failures are loud: the first of each
kind per (source, verifier) is logged whole, a batch with failures logs a one-line summary, and a
batch in which one verifier fails on more than `max_failure_rate` of its samples raises
RewardFailureError (a HomeRLError: the recipe exits with one line, checkpoints stay as they are).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter
from typing import Any, Iterable

from home_rl.console import actor_env, capture_output, phase_done
from home_rl.errors import ConfigError, HomeRLError, ray_get
from home_rl.experts import THINK
from reward.config import RewardConfig, VerifierEntry, check_reward_config, entry_key, entry_label, validate_sources
from reward.registry import absolute_spec, get_verifier, is_batched, is_user_registered
from reward.sandbox import Sandbox
from reward.scoring import (VerifierFailures, as_units, assemble, clean_sample, failures_by_verifier, plan_calls,
                            row_columns, summarize)
from reward.styles import REMOTE, convention_of

logger = logging.getLogger(__name__)


class RewardFailureError(HomeRLError):
    """A verifier failed on more than reward.max_failure_rate of a batch's samples: the run stops."""


class RewardWorker:
    """One reward actor: plans a chunk's verifier calls, runs them in its sandbox, assembles results."""

    def __init__(self, cfg: RewardConfig, setup: dict, rank: int = 0):
        capture_output(f"reward-{rank}")  # first: the sandbox process inherits the log file as its stdout/stderr
        self.cfg = cfg
        self.conventions = {key: ref["convention"] for key, ref in setup["verifiers"].items()}
        self.sandbox = Sandbox(setup)

    def ready(self) -> bool:
        return True

    def score(self, samples: list[dict]) -> list[dict]:
        calls, owners = plan_calls(samples, self.cfg, self.conventions)
        units, order = as_units(calls, self.conventions)
        outcomes: list = [None] * len(calls)
        for i, outcome in zip(order, (o for unit in self.sandbox.run(units) for o in unit)):
            outcomes[i] = outcome
        return assemble(samples, self.cfg, calls, owners, outcomes)

    def close(self) -> None:
        self.sandbox.close()


class RewardPool:
    """`cfg.num_workers` reward actors; `score` splits a batch into one contiguous chunk per actor."""

    def __init__(self, cfg: RewardConfig):
        import ray

        check_reward_config(cfg)
        # Absolute file paths: the actors may run in another folder or on another node.
        sources = {source: [dataclasses.replace(e, name=absolute_spec(e.name)) if e.name else e for e in entries]
                   for source, entries in cfg.sources.items()}
        self.cfg = dataclasses.replace(cfg, sources=sources)
        self.refs = _verifier_refs(self.cfg)  # each function's calling style: a signature that fits none fails now
        setup = {"sys_path": list(sys.path), "verifiers": self.refs}
        start = time.perf_counter()
        worker = ray.remote(RewardWorker).options(**cfg.resources.actor_options(), runtime_env={"env_vars": actor_env()})
        self.workers = [worker.remote(self.cfg, setup, rank) for rank in range(cfg.num_workers)]
        ray_get([w.ready.remote() for w in self.workers])  # a sandbox that cannot start fails here, not mid-run
        phase_done("reward", f"{cfg.num_workers} worker{'s' * (cfg.num_workers > 1)} ready", start)
        self.failure_totals: Counter = Counter()  # (data source, verifier label, kind) -> failures since start
        self._logged: set[tuple[str, str, str]] = set()

    def validate_sources(self, data_sources: Iterable[str]) -> None:
        """Start-up check of a data set's sources against this pool's config (ConfigError names them)."""
        validate_sources(self.cfg, data_sources)

    def check(self, rows: Iterable[dict]) -> None:
        """Start-up check: every data source of `rows` has verifiers, and every verifier of those sources, called in
        its sandbox on the first row of its source with the row's answer as the response, returns a number.
        ConfigError (one line) names the data source, the verifier, its style and the error."""
        first: dict[str, dict] = {}
        for row in rows:
            first.setdefault(str(row["data_source"]), row)
        validate_sources(self.cfg, first)
        probes = [clean_sample(probe_sample(row), i) for i, row in enumerate(first.values())]
        results = ray_get(self.workers[0].score.remote(probes))
        problems = []
        for probe, result in zip(probes, results):
            for entry in self.cfg.sources[probe["data_source"]]:
                error = result.get("error", {}).get(entry_label(entry))
                if error:
                    problems.append(f"data_source {probe['data_source']!r}: {self.describe(entry)} failed on row "
                                    f"{probe['columns'].get('id')!r}: {error['message']}")
        if problems:
            raise ConfigError(one_line("reward probe (each verifier on a real row, its answer as the response): "
                                       + "; ".join(problems)))

    def describe(self, entry: VerifierEntry) -> str:
        """`verifier SPEC (style S)` or `reward server URL`, for messages."""
        if entry.url:
            return f"reward server {entry.url}"
        return f"verifier {entry.name!r} (style {self.refs[entry_key(entry)]['convention'].style})"

    def score(self, samples: list[dict]) -> tuple[list[dict], dict[str, float]]:
        """Score `samples` in parallel; results come back in the order of `samples`.

        Raises RewardFailureError when a verifier fails on more than reward.max_failure_rate of its samples."""
        start = time.perf_counter()
        cleaned = [clean_sample(s, i) for i, s in enumerate(samples)]
        validate_sources(self.cfg, {s["data_source"] for s in cleaned})
        chunks = _split(cleaned, len(self.workers))
        refs = [w.score.remote(chunk) for w, chunk in zip(self.workers, chunks) if chunk]
        results = [r for chunk_results in ray_get(refs) for r in chunk_results]
        self._log_failures(results)
        metrics = summarize(results) if results else {}
        metrics["reward/samples_per_s"] = len(results) / max(time.perf_counter() - start, 1e-9)
        self._stop_if_failing(failures_by_verifier(results))
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

    def _log_failures(self, results: list[dict]) -> None:
        """Count failures; log the first of each kind per (source, verifier) whole, and one summary line per batch."""
        for r in results:
            for label, error in r.get("error", {}).items():
                key = (r["data_source"], label, error["kind"])
                self.failure_totals[key] += 1
                if key not in self._logged:
                    self._logged.add(key)
                    logger.warning("reward verifier %r of data_source %r: first %s, on sample id=%r: %s "
                                   "(the sample scores 0; later ones are counted in reward/failures/%s/%s/%s)",
                                   label, r["data_source"], error["kind"], r["id"], error["message"], *key)
        failing = failures_by_verifier(results)
        if failing:
            logger.warning("reward failures in this batch of %d samples: %s", len(results), "; ".join(
                f"{f.source}/{f.label} {f.failed}/{f.samples} "
                f"({', '.join(f'{n} {kind}' for kind, n in sorted(f.kinds.items()))})" for f in failing))

    def _stop_if_failing(self, failing: list[VerifierFailures]) -> None:
        limit = self.cfg.max_failure_rate
        for f in failing:
            if f.rate > limit:
                entry = next(e for e in self.cfg.sources[f.source] if entry_label(e) == f.label)
                sample_id, kind, message = f.first
                raise RewardFailureError(one_line(
                    f"reward: {self.describe(entry)} of data_source {f.source!r} failed on {f.failed} of {f.samples} "
                    f"samples in one batch ({f.rate:.0%} > reward.max_failure_rate={limit:g}); first {kind}, on sample "
                    f"id={sample_id!r}: {message}. Fix it and run again: trainer.resume=auto continues from the last "
                    f"checkpoint"))


def probe_sample(row: dict) -> dict:
    """A sample of `row` for the start-up probe: its answer (the first one of a list) as the think expert's response
    (the drivers name the answering expert in extra_info: GRPO's samples are the think expert's)."""
    answer = row.get("answer")
    response = answer[0] if isinstance(answer, (list, tuple)) and answer else answer
    return {"id": f"probe:{row.get('id')}", "response": "" if response is None else str(response),
            "ground_truth": answer, "data_source": row["data_source"],
            "extra_info": {**(row.get("extra_info") or {}), "expert": THINK}, "prompt": row.get("prompt"),
            "columns": row_columns(row)}


def one_line(text: str) -> str:
    return " ".join(text.split())


def _verifier_refs(cfg: RewardConfig) -> dict[str, dict]:
    """What a sandbox needs to get each verifier: its spec, or the function itself when the name was registered
    by the caller's code (the sandbox never ran that code), its options, and how to call it (its convention)."""
    import cloudpickle

    refs: dict[str, dict[str, Any]] = {}
    for source, entries in cfg.sources.items():
        for i, entry in enumerate(entries):
            key = entry_key(entry)
            if key in refs:
                continue
            if entry.url:
                refs[key] = {"spec": "", "url": entry.url, "pickled": None, "options": {}, "convention": REMOTE}
                continue
            try:
                fn = get_verifier(entry.name)
            except ConfigError as e:
                raise ConfigError(f"reward.sources.{source}: {e}") from None
            refs[key] = {
                "spec": entry.name,
                "url": "",
                "pickled": cloudpickle.dumps(fn) if is_user_registered(entry.name) else None,
                "options": cfg.verifier_options(entry.name),
                "convention": convention_of(fn, entry.style, is_batched(fn),
                                            what=f"reward.sources.{source}.{i}: verifier {entry.name!r}"),
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

