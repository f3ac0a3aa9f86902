"""LearnerGroup: L learner actors in a Ray placement group, forming one DeepSpeed data-parallel group.

A job passes its placement (home_rl.cluster.Placement, made by the driver) to put each rank in its
bundle; without one the actors ask for `learner.resources` wherever Ray finds them.

Rank 0 picks the rendezvous address and port; every rank joins. Each call splits its batch over
the ranks (similar token counts), tells every rank how many micro-batches to run (the same
number everywhere: ZeRO-3's collectives need it) and the step's global counts (so losses are
normalised over the whole step), then gathers the results.

    group = LearnerGroup(cfg.learner, model_dir, dtype="float32", total_steps=100)
    metrics = group.train_step(sequences)                  # loss, token_loss, grad_norm, lr, tokens_per_s, ...
    old = group.log_probs(sequences)                       # one tensor per sequence, its response tokens
    for name, tensor in group.iter_weights(view="think", only_trainable=True): ...
    group.save_checkpoint(folder); group.load_checkpoint(folder); group.save_model(out_dir)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Optional

import torch

from home_rl.config import to_dict
from home_rl.console import actor_env, phase_done
from home_rl.errors import ray_get
from home_rl.learner.batch import Sequence
from home_rl.learner.plan import plan_micro_batches, row_length, split_for_ranks
from home_rl.learner.config import LearnerConfig
from home_rl.learner.worker import LearnerWorker
from home_rl.memory_plan import resolve_zero_stage

# Metrics that are the same on every rank (not shares to add up).
_SHARED_METRICS = ("grad_norm", "lr", "step")


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, model_path: str, dtype: str = "bfloat16", total_steps: int = 1,
                 placement: Any = None):
        import ray

        start = time.perf_counter()
        # the stage as a number: the recipes resolve learner.zero_stage=auto at start-up from the memory plan; a
        # group built in code without a plan (tests, benchmarks) gets the resolver's documented rule for that case
        cfg = dataclasses.replace(cfg, zero_stage=resolve_zero_stage(cfg.zero_stage))
        self.cfg = cfg
        self.world_size = cfg.num_learners
        # Tokens through the model's forward passes so far (fillers aside), every call and rank together:
        # with shared prefixes a prompt counts once per row, without once per sequence.
        self.tokens_computed = 0
        self.positions_computed = 0  # the same with padding: what the forward passes compute (rows x longest row)
        self.global_step = 0  # optimizer steps the learners have taken (restored with a checkpoint)
        if placement is not None:
            options = [placement.learner_options(i) for i in range(self.world_size)]
        else:
            gpus = cfg.gpus_per_learner(ray.cluster_resources().get("GPU", 0))
            options = [cfg.resources.actor_options(gpus)] * self.world_size
        threads = cfg.resources.num_threads()
        env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **actor_env()}
        if not options[0]["num_gpus"]:
            env["DS_ACCELERATOR"] = "cpu"
        # rank 0 sends weights on a thread of its own ("weights"), beside the one that trains
        actor = ray.remote(concurrency_groups={"weights": 1})(LearnerWorker)
        self.actors = [actor.options(**options[i], runtime_env={"env_vars": env})
                       .remote(i, self.world_size, to_dict(cfg), threads) for i in range(self.world_size)]
        addr, port = ray.get(self.actors[0].address.remote())
        try:
            self.info = ray_get([a.setup.remote(addr, port, str(model_path), dtype, total_steps) for a in self.actors])
        except BaseException:
            self.shutdown()
            raise
        phase_done("learners", f"{self.world_size} ready", start)

    # ------------------------------------------------------------------ calls on every rank

    def _run(self, method: str, *args, **kwargs) -> list[Any]:
        return ray_get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def _shards(self, batch: list[Sequence]) -> tuple[list[list[int]], list[list[list[list[int]]]], int]:
        """Each rank's sequences (indices into batch), its micro-batch plan (rows of indices into its shard), and
        the micro-batch count every rank runs: planned here once, executed as given by the workers."""
        cfg = self.cfg
        shards = split_for_ranks(batch, self.world_size, cfg.shared_prefix)
        plans = []
        for shard in shards:
            seqs = [batch[i] for i in shard]
            plan = plan_micro_batches(seqs, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, cfg.shared_prefix)
            plans.append(plan)
            self.tokens_computed += sum(row_length(seqs, row) for rows in plan for row in rows)
            self.positions_computed += sum(len(rows) * max(row_length(seqs, row) for row in rows) for rows in plan)
        return shards, plans, max(len(plan) for plan in plans)

    def train_step(self, batch: list[Sequence], loss: Any = "sft", router_loss_weight: float = 0.0,
                   temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step on `batch` (all its sequences, split over the ranks and into micro-batches).

        Returns the step's metrics: loss (and the loss function's own terms), grad_norm, lr,
        tokens, tokens_per_s, step_s, ...; with router labels also router_loss and router_acc.
        """
        start = time.perf_counter()
        before = self.tokens_computed
        shards, plans, num_micro = self._shards(batch)
        totals = {"tokens": sum(s.num_loss_tokens for s in batch), "sequences": len(batch),
                  "labelled": sum(s.router_label is not None for s in batch)}
        results = ray_get([a.train_step.remote([batch[i] for i in shard], plan, num_micro, totals, loss,
                                               router_loss_weight, temperature)
                           for a, shard, plan in zip(self.actors, shards, plans)])
        metrics = {k: v for k, v in results[0].items() if k in _SHARED_METRICS}
        self.global_step = int(results[0]["step"])
        for key in results[0]:
            if key not in _SHARED_METRICS:
                metrics[key] = (max if key.endswith("_max") else sum)(r[key] for r in results)
        metrics["compute_s"] = max(r["compute_s"] for r in results)
        elapsed = time.perf_counter() - start
        tokens = sum(len(s) for s in batch)
        metrics.update(step_s=elapsed, tokens=tokens, tokens_computed=self.tokens_computed - before,
                       loss_tokens=totals["tokens"], tokens_per_s=tokens / elapsed, sequences=len(batch))
        if totals["labelled"] and "router_correct" in metrics:
            metrics["router_acc"] = metrics.pop("router_correct") / totals["labelled"]
        return metrics

    def log_probs(self, batch: list[Sequence], temperature: float = 1.0,
                  with_entropy: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Log-probs of each sequence's response tokens (and their entropies), in batch order."""
        per_seq = self._per_sequence(batch, "log_probs", temperature, with_entropy)
        log_probs = [lp for lp, _ in per_seq]
        return (log_probs, [e for _, e in per_seq]) if with_entropy else log_probs

    def logits(self, batch: list[Sequence]) -> list[torch.Tensor]:
        """Logits [response tokens, vocab] of each sequence (for checks on small batches)."""
        return self._per_sequence(batch, "logits")

    def _per_sequence(self, batch: list[Sequence], method: str, *args) -> list:
        """Call a per-sequence method on every rank's shard; results back in batch order."""
        shards, plans, num_micro = self._shards(batch)
        results = ray_get([getattr(a, method).remote([batch[i] for i in shard], plan, num_micro, *args)
                           for a, shard, plan in zip(self.actors, shards, plans)])
        out: list = [None] * len(batch)
        for shard, values in zip(shards, results):
            for i, value in zip(shard, values):
                out[i] = value
        return out

    # ------------------------------------------------------------------ weights and checkpoints

    def iter_weights(self, view: Optional[str] = None, only_trainable: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs, gathered one decoder layer at a time (never the whole model at once).

        `view` ("think" / "fast", HOME models): the expert view's parameters under the dense model's
        names, as rollout engines load them. `only_trainable`: just what this learner changes.
        """
        import ray

        chunks = ray.get(self.actors[0].weight_chunks.remote(view, only_trainable))
        for names in chunks:
            yield from self._run("gather", names, view)[0]

    def stage_weights(self, version: int, view: Optional[str] = None, only_trainable: bool = False,
                      changed: bool = True, keep_from: int = 0, merge_adapter: bool = False) -> None:
        """Version `version` of the served tensors (`view`, `only_trainable` as in iter_weights) kept on rank 0 for
        the rollout engines, which load it through `weight_sender()`; `changed` False: version - 1's tensors.
        Older versions than `keep_from` are dropped (none that an engine may still need to be refilled with).
        `merge_adapter`: a LoRA expert's projections merged (for engines holding its merged view), not the adapter."""
        self._run("stage_weights", version, view, only_trainable, changed, keep_from, merge_adapter)

    def weight_sender(self) -> Any:
        """The home_rl.weights Sender for a RolloutPool: rank 0 sends its staged versions to the engines."""
        from home_rl.weights import ActorSender

        return ActorSender(self.actors[0])

    def peak_rss_gb(self) -> list[float]:
        """Each learner process's peak resident memory so far, GB (for benchmarks)."""
        return self._run("peak_rss_gb")

    def save_checkpoint(self, folder: str) -> None:
        """Engine + optimiser + schedule state of every rank into `folder` (the caller makes it atomic)."""
        self._run("save_checkpoint", str(folder))

    def load_checkpoint(self, folder: str) -> int:
        """Restore a checkpoint saved by save_checkpoint; returns the optimizer step it was taken at."""
        self.global_step = self._run("load_checkpoint", str(folder))[0]
        return self.global_step

    def save_model(self, out_dir: str) -> str:
        """The trained model as a checkpoint of the input's kind: a dense HF folder or a HOME checkpoint."""
        return self._run("save_model", str(out_dir))[0]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

