"""Where the job's actors run: placement groups for learners and rollout workers, checked up front.

    cluster:
      mode: disaggregated                 # or colocated
    learner: {num_learners: 8, resources: {node_resource: learner}}
    rollout: {num_workers: 4, tensor_parallel_size: 2, in_process_engine: false,
              resources: {gpus: 2, node_resource: rollout}}
    reward:  {num_workers: 16}

This module takes bundles (what each actor asks for, home_rl.resources) and knows no group's
config; the drivers build the bundles from their configs (home_rl.trainer.startup.job_placement).

- disaggregated: learners in one PACKed placement group (a bundle per learner: a GPU and its CPUs),
  rollout workers in a SPREAD group (a bundle per worker: its GPUs and CPUs), reward workers and
  other actors wherever CPUs are free. A restarted rollout worker gets its bundle back.
- colocated: one placement group; bundle i holds learner i and rollout worker i, which share its
  GPU (half each, as far as Ray counts). The vLLM engines sleep during the update where the
  build supports it (CUDA), so the learner gets the memory back.

Before anything starts, the demand is checked against the nodes of the cluster. What cannot be
placed fails within `cluster.resource_wait_s` with a message that names the missing resources
and the config keys behind them, instead of a placement that waits forever.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, ClassVar, Optional, Sequence

from home_rl.errors import HomeRLError

log = logging.getLogger(__name__)

COLOCATED_GPU_SHARE = 0.5  # learner and rollout worker of a colocated bundle each count half its GPU


class ClusterResourceError(HomeRLError):
    """The Ray cluster cannot host what the config asks for (the message names what is missing)."""


@dataclasses.dataclass
class ClusterConfig:
    mode: str = "disaggregated"  # disaggregated: rollout workers and learners on their own GPUs | colocated: rollout worker i shares learner i's GPU, its engine sleeping during updates (CUDA)
    check_memory: bool = True  # refuse a job whose predicted peak memory (home_rl/memory_plan/) exceeds what an actor gets, before any actor starts; false skips it (lengths are still checked)
    resource_wait_s: float = 10.0  # wait this long for missing resources (autoscaling clusters: raise to a node's start time) before failing with what is missing

    CHOICES: ClassVar[dict] = {"mode": ("disaggregated", "colocated")}


@dataclasses.dataclass
class Bundle:
    """What one actor asks for, and who asks (for error messages)."""
    resources: dict[str, float]  # Ray resources: CPU, GPU, node labels
    owner: str  # e.g. "learner 0", "rollout worker 1"
    keys: str  # the config keys that decide these resources


def rendezvous_address() -> tuple[str, int]:
    """This node's address as the other nodes reach it, and a port free on it now: where a process group's rank 0
    listens (the learners' torch.distributed group, the weight plane's group with the engines)."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _merge(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


# ----------------------------------------------------------------------------- the resource check


def node_totals() -> list[dict[str, float]]:
    """Total resources of each alive node (what the cluster could ever give this job)."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
            for n in ray.nodes() if n.get("Alive")]


def shortage(bundles: list[Bundle], nodes: list[dict[str, float]]) -> Optional[str]:
    """None when every bundle fits on some node (first fit, largest first), else what is missing."""
    need = _merge(*(b.resources for b in bundles))
    have = _merge(*nodes) if nodes else {}
    missing = []
    for key, amount in sorted(need.items()):
        if amount <= 0:
            continue
        # Ray counts logical CPUs, and `ray start` declares the machine's cores unless told otherwise: on one
        # machine the fix is a flag (the actors then share the cores), not more hardware. -int(-x // 1) rounds up.
        cpu_hint = f" (on one machine: ray start --head --num-cpus {-int(-amount // 1)})" if key == "CPU" else ""
        if have.get(key, 0.0) <= 0:
            hint = f" (start those nodes with: ray start --resources '{{\"{key}\": 1}}')" if key not in ("CPU", "GPU") else cpu_hint
            missing.append(f"{key}: no node has it{hint}")
        elif have[key] + 1e-9 < amount:
            missing.append(f"{key}: {amount:g} needed, the cluster has {have[key]:g}{cpu_hint}")
    if missing:
        return "missing " + "; ".join(missing)
    largest_first = sorted(bundles, key=lambda b: (-b.resources.get("GPU", 0), -b.resources.get("CPU", 0)))
    for b, node in zip(largest_first, first_fit([b.resources for b in largest_first], nodes)):
        if node is None:
            return (f"no node has room for {b.owner} ({_fmt(b.resources)}) once the others are placed; "
                    f"nodes: {'; '.join(_fmt(n) for n in nodes)}")
    return None


def first_fit(demands: Sequence[dict[str, float]], nodes: Sequence[dict[str, float]],
              fallback: Optional[int] = None) -> list[Optional[int]]:
    """Where each demand goes, in the order given: the index of the first node with room left for all of it (which
    it then takes from that node). One that fits nowhere goes to node `fallback`, taking what it asks there all the
    same (below zero), or with fallback None nowhere (None). The one placement rule of the resource check (shortage:
    largest bundles first, nothing overcommitted) and of the memory plan (home_rl/memory_plan/plan.py: the groups in
    the order they start, what no node has room for counted on the driver's node)."""
    free = [dict(n) for n in nodes]
    out: list[Optional[int]] = []
    for demand in demands:
        # 1e-9: fractional resources (a colocated bundle's half GPU, labels of 0.001) add up with rounding errors
        i = next((k for k, node in enumerate(free) if all(node.get(key, 0.0) + 1e-9 >= amount
                                                           for key, amount in demand.items())), fallback)
        if i is not None:
            for key, amount in demand.items():
                free[i][key] = free[i].get(key, 0.0) - amount
        out.append(i)
    return out


def check_resources(bundles: list[Bundle], wait_s: float) -> None:
    """Raise ClusterResourceError unless the cluster can host `bundles`, waiting up to wait_s for nodes."""
    deadline = time.monotonic() + wait_s
    requested = False
    try:
        while True:
            problem = shortage(bundles, node_totals())
            if problem is None:
                return
            if time.monotonic() >= deadline:
                break
            if not requested:  # tell an autoscaler (if there is one) what to start; harmless without one
                requested = _request_resources([b.resources for b in bundles])
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    finally:
        if requested:  # a standing request would keep nodes up after this job; placement groups take over
            _request_resources([])
    asks = {}
    for b in bundles:
        asks.setdefault((b.owner.split(" ")[0], b.keys), []).append(b)
    detail = "; ".join(f"{len(bs)} × {_fmt(bs[0].resources)} for {group} ({keys})" for (group, keys), bs in asks.items())
    raise ClusterResourceError(f"the Ray cluster cannot host this job: {problem}. Asked for: {detail}. "
                               f"Lower those settings or add nodes (waited {wait_s:g} s: cluster.resource_wait_s)")


def _request_resources(bundles: list[dict[str, float]]) -> bool:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        return True
    except Exception:  # noqa: BLE001  no autoscaler API on this cluster: just wait
        return False


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"


# ----------------------------------------------------------------------------- placement


class Placement:
    """Placement groups for a job's learners and rollout workers, and actor options per rank.

    Any group may be empty (an SFT run has no rollout workers, an evaluation no learners). `others`
    (reward workers, a router trainer) need no placement group, but the check counts them too.
    """

    def __init__(self, cfg: Optional[ClusterConfig] = None, learner: tuple[Bundle, ...] = (),
                 rollout: tuple[Bundle, ...] = (), others: tuple[Bundle, ...] = ()):
        from ray.util.placement_group import placement_group

        self.cfg = cfg or ClusterConfig()
        if self.cfg.mode not in ClusterConfig.CHOICES["mode"]:
            raise ClusterResourceError(f"cluster.mode must be one of {', '.join(ClusterConfig.CHOICES['mode'])}, "
                                       f"got {self.cfg.mode!r}")
        self.learner, self.rollout = list(learner), list(rollout)
        self.colocated = self.cfg.mode == "colocated" and bool(learner) and bool(rollout)
        if self.colocated and len(rollout) != len(learner):
            raise ClusterResourceError(f"cluster.mode=colocated pairs rollout worker i with learner i: "
                                       f"rollout.num_workers ({len(rollout)}) must equal "
                                       f"learner.num_learners ({len(learner)})")
        if self.colocated:  # bundle i holds the pair: their CPUs and labels add up, the GPU is one
            self.learner_bundles = [Bundle(_merge(a.resources, {k: v for k, v in b.resources.items() if k != "GPU"}),
                                           f"{a.owner} + {b.owner}", f"{a.keys}, {b.keys}") for a, b in zip(learner, rollout)]
            self.rollout_bundles: list[Bundle] = []
        else:
            self.learner_bundles, self.rollout_bundles = list(learner), list(rollout)
        check_resources(self.learner_bundles + self.rollout_bundles + list(others), self.cfg.resource_wait_s)

        self.groups = []
        self.learner_group = self._group(placement_group, self.learner_bundles, "PACK")
        self.rollout_group = self._group(placement_group, self.rollout_bundles, "SPREAD")
        log.info("placement (%s): %s", self.cfg.mode, self.describe())

    def _group(self, placement_group, bundles: list[Bundle], strategy: str):
        import ray

        if not bundles:
            return None
        group = placement_group([dict(b.resources) for b in bundles], strategy=strategy)
        self.groups.append(group)
        ready, _ = ray.wait([group.ready()], timeout=max(self.cfg.resource_wait_s, 5.0))
        if not ready:  # the resources exist but other jobs hold them
            self.shutdown()
            raise ClusterResourceError(f"the Ray cluster has the resources for {bundles[0].owner.split(' ')[0]}s "
                                       f"({len(bundles)} × {_fmt(bundles[0].resources)}) but other work holds "
                                       f"them (free now: {_fmt(ray.available_resources())}); waited "
                                       f"{max(self.cfg.resource_wait_s, 5.0):g} s (cluster.resource_wait_s)")
        return group

    # ------------------------------------------------------------------ actor options

    def learner_options(self, rank: int) -> dict[str, Any]:
        return self._options(self.learner[rank], self.learner_group, rank)

    def rollout_options(self, rank: int) -> dict[str, Any]:
        group = self.learner_group if self.colocated else self.rollout_group
        return self._options(self.rollout[rank], group, rank)

    def _options(self, bundle: Bundle, group, rank: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = dict(bundle.resources)
        cpus, gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
        if self.colocated:  # the pair's one GPU, half each as Ray counts (the learner's GPU decides)
            gpus = COLOCATED_GPU_SHARE if self.learner[rank].resources.get("GPU") else 0.0
        return {"num_cpus": cpus, "num_gpus": gpus, "resources": res,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)}

    def describe(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "learner_bundles": [_fmt(b.resources) for b in self.learner_bundles],
                "rollout_bundles": [_fmt(b.resources) for b in self.rollout_bundles]}

    def shutdown(self) -> None:
        """Remove the placement groups (their actors must be gone or going)."""
        import ray

        for group in self.groups:
            try:
                ray.util.remove_placement_group(group)
            except Exception:  # noqa: BLE001  already gone with the cluster
                pass
        self.groups = []
