"""The plan: every actor's predicted peak against what it gets on a cluster, for one ZeRO stage, and the start-up
check that refuses a config that cannot fit."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from home_rl.cluster import first_fit
from home_rl.errors import ConfigError
from home_rl.memory_plan.advice import host_advice, learner_advice, length_problems
from home_rl.memory_plan.estimates import (DRIVER_BASELINE_GIB, GPU_CONTEXT_GIB, LEARNER_BASELINE_GIB,
                                           REWARD_WORKER_GIB, ROLLOUT_BASELINE_GIB, WEIGHT_SENDER_GIB,
                                           kv_bytes_per_token, learner_parts, rollout_parts)
from home_rl.memory_plan.nodes import GIB, USABLE, Cluster, current_cluster
from home_rl.memory_plan.report import ActorPlan, MemoryPlan
from home_rl.memory_plan.run import Run
from home_rl.memory_plan.shapes import ModelShape, model_shape, planned_model_dir
from home_rl.memory_plan.zero_stage import resolve_zero_stage


@dataclasses.dataclass
class _Draft:
    """A plan being written: its actors, advice (one per actor that does not fit, in order) and notes, and what
    each actor placed on a node takes: (GPUs, host GiB), in the order they are placed."""
    cluster: Cluster
    actors: list[ActorPlan] = dataclasses.field(default_factory=list)
    advice: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    placed: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def gpu_size(self) -> float:  # the largest GPU: what a GPU actor is planned on
        return max((n.gpu_gib for n in self.cluster.nodes), default=0.0)

    @property
    def host0(self) -> float:  # what a CPU actor may plan on: the driver's node
        return self.cluster.nodes[0].host_gib * USABLE

    def place(self, gpus: int, host_gib: float, count: int) -> None:
        self.placed.extend([(gpus, host_gib)] * count)

    def host_by_node(self) -> list[float]:
        """Host RAM per node: first fit by GPUs in the order placed (learners PACK, rollout workers SPREAD over what
        is left), home_rl.cluster's rule; an actor whose GPUs no node has left in this order is counted on node 0,
        the driver's (the resource check, which places the largest bundles first, says whether Ray can host it)."""
        gpus = [{"GPU": g} for g, _ in self.placed]
        host = [0.0] * len(self.cluster.nodes)
        for node, (_, gib) in zip(first_fit(gpus, [{"GPU": n.gpus} for n in self.cluster.nodes], fallback=0),
                                  self.placed):
            host[node] += gib
        return host


def plan(shape: ModelShape, run: Run, cluster: Cluster, zero_stage: Optional[int]) -> MemoryPlan:
    """Every actor's predicted peak against what it gets on `cluster`, the learners at ZeRO stage `zero_stage`
    (a number: learner.zero_stage=auto is resolved first, by resolve_zero_stage; None only for a run without
    learners)."""
    if run.learner is not None and not isinstance(zero_stage, int):
        raise ValueError(f"plan() needs the learners' ZeRO stage as a number, got {zero_stage!r}: resolve "
                         f"learner.zero_stage first (home_rl.memory_plan.resolve_zero_stage)")
    draft = _Draft(cluster)
    colocated = run.mode == "colocated" and run.learner is not None and run.rollout is not None
    learner_state = _learners(draft, shape, run, zero_stage, colocated) if run.learner is not None else 0.0
    if run.rollout is not None:
        _rollout(draft, shape, run, colocated, learner_state)
    _single_actors(draft, shape, run)
    stage = zero_stage if run.learner is not None else None
    host_of = draft.host_by_node()
    driver = {"baseline": DRIVER_BASELINE_GIB}  # it holds no weights: they go from learner rank 0 to the engines
    host_of[0] += sum(driver.values())
    _add(draft, ActorPlan("driver", 1, "cpu", sum(driver.values()), draft.host0, driver),
         "the driver's node lacks memory for its baseline: run it on a node with more RAM")
    if run.exports_view:  # export_think_view: HomeModel.from_pretrained in the checkpoint's dtype, in a process of its
        # own beside the driver before the learners and engines load (so not in the nodes' sums)
        export = {"baseline": LEARNER_BASELINE_GIB, "checkpoint": shape.home_checkpoint * shape.disk_bytes / GIB}
        _add(draft, ActorPlan("view export", 1, "cpu", sum(export.values()), draft.host0 - DRIVER_BASELINE_GIB,
                              export), "the think view's export loads the whole HOME checkpoint: run the driver on "
                                       "a node with more RAM")
    for i, (node, used) in enumerate(zip(cluster.nodes, host_of)):
        _add(draft, ActorPlan(f"host node {i}", 1, "host", used, node.host_gib * USABLE, {"placed": used}),
             host_advice(run, stage))
    return MemoryPlan(draft.actors, draft.advice, zero_stage=stage, problems=length_problems(shape, run),
                      notes=draft.notes)


def _add(draft: _Draft, actor: ActorPlan, advice: str) -> None:
    draft.actors.append(actor)
    if not actor.fits:
        draft.advice.append(advice)


def _learners(draft: _Draft, shape: ModelShape, run: Run, stage: int, colocated: bool) -> float:
    """The learners' row; returns what a learner keeps on its GPU while a colocated engine generates beside it."""
    learner, cluster = run.learner, draft.cluster
    gpus = cluster.gpus
    on_gpu = learner.gpus_per_learner(gpus) > 0
    b = 4 if run.dtype == "float32" or (run.dtype == "bfloat16" and not cluster.bf16 and not on_gpu) else 2
    parts = learner_parts(shape, learner, stage, b, run)
    loading = parts.pop("loading")
    # rank 0 keeps the versions the engines load (the trainable tensors, in host memory; a LoRA think expert's
    # projections with the adapter merged where the engines hold the merged view) and sends them
    merged = shape.adapted and run.rollout is not None and not run.rollout.serves_adapter
    served = shape.adapted if merged else shape.trainable
    staged = run.staged_versions * served * b / GIB + (WEIGHT_SENDER_GIB if run.staged_versions else 0.0)
    train = sum(parts.values())
    advice = learner_advice(learner, stage, on_gpu, parts)
    if on_gpu and gpus < learner.num_learners * learner.gpus_per_learner(gpus):
        # GPUs the cluster lacks: the resource check (job_placement) names them, by their keys
        draft.notes.append(f"learners: not planned, {cluster.source} lacks their GPUs (the resource check says which)")
    elif on_gpu and draft.gpu_size <= 0:
        draft.notes.append("learners: not planned on their GPUs, whose memory is unknown (recipes/plan.py --gpu-gib)")
        draft.place(1, LEARNER_BASELINE_GIB + loading, learner.num_learners)
    elif on_gpu:
        # colocated, the engine beside it sleeps during the update but keeps its CUDA context
        available = draft.gpu_size * USABLE - (GPU_CONTEXT_GIB if colocated else 0.0)
        _add(draft, ActorPlan("learner", learner.num_learners, "cuda", train + GPU_CONTEXT_GIB, available,
                              {**parts, "cuda_context": GPU_CONTEXT_GIB}), advice)
        draft.place(1, LEARNER_BASELINE_GIB + max(loading, staged), 1)
        draft.place(1, LEARNER_BASELINE_GIB + loading, learner.num_learners - 1)
        return parts["weights"] + parts["gradients"] + parts["optimizer"] + GPU_CONTEXT_GIB
    else:  # on a CPU the host holds it all: loading comes first, training after (the peak is the larger)
        predicted = LEARNER_BASELINE_GIB + max(loading, train + staged)  # rank 0's, the largest
        _add(draft, ActorPlan("learner", learner.num_learners, "cpu", predicted, draft.host0,
                              {**parts, "baseline": LEARNER_BASELINE_GIB, "loading": loading,
                               "staged_versions": staged}), advice)
        draft.place(0, predicted, 1)
        draft.place(0, LEARNER_BASELINE_GIB + max(loading, train), learner.num_learners - 1)
    return 0.0


def _rollout(draft: _Draft, shape: ModelShape, run: Run, colocated: bool, learner_state: float) -> None:
    rollout, cluster, gpu_size = run.rollout, draft.cluster, draft.gpu_size
    on_gpu = rollout.resources.gpus > 0  # rollout workers take GPUs only when asked (rollout.resources.gpus)
    parts = rollout_parts(shape, rollout, on_gpu, gpu_size, cluster.bf16)
    if on_gpu and cluster.gpus < rollout.num_workers * rollout.resources.gpus:
        draft.notes.append(f"rollout: not planned, {cluster.source} lacks its GPUs (the resource check says which)")
    elif on_gpu and gpu_size <= 0:
        draft.notes.append("rollout: not planned on its GPUs, whose memory is unknown (recipes/plan.py --gpu-gib)")
        draft.place(int(rollout.resources.gpus), ROLLOUT_BASELINE_GIB + parts["weights"], rollout.num_workers)
    elif on_gpu:
        # vLLM takes gpu_memory_utilization of the GPU whole (weights, activations, the rest as KV cache); it
        # must hold the weights, its activations and the KV cache of one max_model_len sequence
        budget = rollout.gpu_memory_utilization * gpu_size
        one_sequence = rollout.max_model_len * kv_bytes_per_token(shape, rollout) / GIB
        need = parts["weights"] + parts["activations"] + parts.get("vision_buffers", 0.0) + one_sequence
        host = ROLLOUT_BASELINE_GIB + parts["weights"]  # safetensors pass through host memory on their way
        if colocated:  # the engine sleeps (weights to host, KV dropped) while its learner updates
            host += parts["weights"]
        if need > budget:
            _add(draft, ActorPlan("rollout", rollout.num_workers, "cuda", need, budget,
                                  {**parts, "kv_cache": one_sequence}),
                 f"rollout: the weights, activations and one rollout.max_model_len={rollout.max_model_len} "
                 f"sequence need {need:.1f} GiB of its gpu_memory_utilization share ({budget:.1f} GiB): "
                 f"raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size, or lower "
                 f"rollout.max_model_len")
        else:
            available = gpu_size - learner_state if colocated else gpu_size
            _add(draft, ActorPlan("rollout", rollout.num_workers, "cuda", budget + GPU_CONTEXT_GIB, available,
                                  {**parts, "cuda_context": GPU_CONTEXT_GIB}),
                 "lower rollout.gpu_memory_utilization" + (" (colocated, its learner's weights and optimizer state "
                                                           "stay on the GPU)" if colocated else ""))
        draft.place(0 if colocated else int(rollout.resources.gpus), host, rollout.num_workers)
    else:
        predicted = ROLLOUT_BASELINE_GIB + sum(parts.values())
        _add(draft, ActorPlan("rollout", rollout.num_workers, "cpu", predicted, draft.host0,
                              {**parts, "baseline": ROLLOUT_BASELINE_GIB}),
             "lower rollout.kv_cache_gib or rollout.num_workers")
        draft.place(0, predicted, rollout.num_workers)


def _single_actors(draft: _Draft, shape: ModelShape, run: Run) -> None:
    """The router trainer and the reward workers: CPU actors beside the groups."""
    if run.router_trainer:  # HomeModel.from_pretrained in the checkpoint's dtype, read a tensor at a time
        weights = shape.home_checkpoint * shape.disk_bytes / GIB
        predicted = LEARNER_BASELINE_GIB + weights
        _add(draft, ActorPlan("router trainer", 1, "cpu", predicted, draft.host0,
                              {"weights": weights, "loading": weights, "baseline": LEARNER_BASELINE_GIB}),
             "the router trainer holds the whole HOME checkpoint: give it a node with more RAM")
        draft.place(0, predicted, 1)
    if run.reward_workers:
        draft.actors.append(ActorPlan("reward", run.reward_workers, "cpu", REWARD_WORKER_GIB, draft.host0,
                                      {"baseline": REWARD_WORKER_GIB}))
        draft.place(0, REWARD_WORKER_GIB, run.reward_workers)


# ----------------------------------------------------------------------------- a recipe's config


def plan_for_config(cfg: Any, *, cluster: Optional[Cluster] = None,
                    model_dir: Optional[str | Path] = None) -> MemoryPlan:
    """The plan of a recipe's config (its memory_run() says what it runs) on `cluster` (None: where the recipe would
    run), from `model_dir`'s config.json (None: the one its model path names). learner.zero_stage=auto is planned at
    the stage resolve_zero_stage picks (MemoryPlan.zero_stage); the config itself is not changed."""
    run: Run = cfg.memory_run()
    folder = Path(model_dir) if model_dir is not None else planned_model_dir(run.model_path, run.embedded_home)
    learner = run.learner
    shape = model_shape(folder, learner.trainable if learner is not None else "all",
                        list(learner.frozen_copies) if learner is not None else ())
    cluster = cluster or current_cluster()
    if learner is None:
        return plan(shape, run, cluster, None)
    return plan(shape, run, cluster, resolve_zero_stage(learner.zero_stage, lambda s: plan(shape, run, cluster, s)))


def check_memory(cfg: Any, model_dir: str | Path, *, cluster: Optional[Cluster] = None) -> MemoryPlan:
    """The plan of `cfg`, refused with ConfigError (exit 2, one line naming the actor and the knob) when something
    cannot fit; cluster.check_memory=false lets a config that does not fit through, but never lengths that cannot
    work. The caller records the plan's zero_stage where the config says auto (home_rl/trainer/startup.py)."""
    result = plan_for_config(cfg, cluster=cluster, model_dir=model_dir)
    enabled = getattr(getattr(cfg, "cluster", None), "check_memory", True)
    refusal = result.refusal()
    if refusal is not None and (enabled or result.problems):
        raise ConfigError(refusal + ("" if result.problems else " (cluster.check_memory=false skips this check)"))
    return result
