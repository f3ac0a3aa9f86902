"""Where the job's actors run: placement groups for learners and rollout workers, checked up front.

    cluster:
      mode: disaggregated                 # or colocated
    learner: {num_learners: 8, node_resource: learner}
    rollout: {num_workers: 4, gpus_per_worker: 2, tensor_parallel_size: 2, in_process_engine: false,
              node_resource: rollout}
    reward:  {num_workers: 16, node_resource: ""}

Node types are marked with custom Ray resources (`ray start --resources '{"rollout": 1}'`). An actor
whose section names one asks for a sliver of it (LABEL_SHARE): it runs only on such nodes, while
CPUs and GPUs, not the label, decide how many share a node.

- disaggregated: learners in one PACKed placement group (a bundle per learner: a GPU and its CPUs),
  rollout workers in a SPREAD group (a bundle per worker: its GPUs and CPUs), reward workers
  wherever CPUs are free. A restarted rollout worker gets its bundle back.
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
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from home_rl.errors import HomeRLError

if TYPE_CHECKING:
    from home_rl.learner.config import LearnerConfig
    from home_rl.rollout.config import RolloutConfig
    from reward.config import RewardConfig

log = logging.getLogger(__name__)

LABEL_SHARE = 0.001  # how much of its node label resource an actor asks for (a label, not a count)
COLOCATED_GPU_SHARE = 0.5  # learner and rollout worker of a colocated bundle each count half its GPU


class ClusterResourceError(HomeRLError):
    """The Ray cluster cannot host what the config asks for (the message names what is missing)."""


@dataclasses.dataclass
class ClusterConfig:
    mode: str = "disaggregated"  # disaggregated: rollout workers and learners on their own GPUs | colocated: rollout worker i shares learner i's GPU, its engine sleeping during updates (CUDA)
    resource_wait_s: float = 10.0  # wait this long for missing resources (autoscaling clusters: raise to a node's start time) before failing with what is missing

    CHOICES: ClassVar[dict] = {"mode": ("disaggregated", "colocated")}


@dataclasses.dataclass
class Bundle:
    """Resources of one placement-group bundle, and who asked for them (for error messages)."""
    resources: dict[str, float]
    owner: str  # e.g. "learner 0", "rollout worker 1", "learner 0 + rollout worker 0"
    keys: str  # the config keys that decide these resources


def label_resources(label: str) -> dict[str, float]:
    return {label: LABEL_SHARE} if label else {}


def learner_uses_gpu(cfg: "LearnerConfig") -> bool:
    """learner.device: auto takes GPUs when the cluster has one per learner."""
    import ray

    if cfg.device == "cpu":
        return False
    if cfg.device == "cuda":
        return True  # a shortage is reported by the resource check, with the rest of what is missing
    return ray.cluster_resources().get("GPU", 0) >= cfg.num_learners


def learner_bundle(cfg: "LearnerConfig", use_gpu: bool) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_learner, **({"GPU": 1.0} if use_gpu else {}), **label_resources(cfg.node_resource)}


def rollout_bundle(cfg: "RolloutConfig") -> dict[str, float]:
    gpus = {"GPU": float(cfg.gpus_per_worker)} if cfg.gpus_per_worker else {}
    return {"CPU": cfg.cpus_per_worker, **gpus, **label_resources(cfg.node_resource)}


def reward_bundle(cfg: "RewardConfig") -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **label_resources(cfg.node_resource)}


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
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.resources.get("GPU", 0), -b.resources.get("CPU", 0))):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.resources.items())), None)
        if node is None:
            return (f"no node has room for {b.owner} ({_fmt(b.resources)}) once the others are placed; "
                    f"nodes: {'; '.join(_fmt(n) for n in nodes)}")
        for k, v in b.resources.items():
            node[k] -= v
    return None


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
    """Placement groups for a job's learners and rollout workers; actor options per rank.

    Either section may be left out (an SFT run has no rollout workers, an evaluation no learners).
    """

    def __init__(self, cfg: Optional[ClusterConfig] = None, learner: Optional["LearnerConfig"] = None,
                 rollout: Optional["RolloutConfig"] = None, reward: Optional["RewardConfig"] = None):
        from ray.util.placement_group import placement_group

        self.cfg = cfg or ClusterConfig()
        if self.cfg.mode not in ClusterConfig.CHOICES["mode"]:
            raise ClusterResourceError(f"cluster.mode must be one of {', '.join(ClusterConfig.CHOICES['mode'])}, "
                                       f"got {self.cfg.mode!r}")
        self.learner, self.rollout = learner, rollout
        self.colocated = self.cfg.mode == "colocated" and learner is not None and rollout is not None
        self.learner_gpu = learner is not None and learner_uses_gpu(learner)
        if self.colocated and rollout.num_workers != learner.num_learners:
            raise ClusterResourceError(f"cluster.mode=colocated pairs rollout worker i with learner i: "
                                       f"rollout.num_workers ({rollout.num_workers}) must equal "
                                       f"learner.num_learners ({learner.num_learners})")
        if self.colocated and rollout.tensor_parallel_size > 1:
            raise ClusterResourceError("cluster.mode=colocated needs rollout.tensor_parallel_size=1 (one GPU per pair)")

        learner_keys = "learner.num_learners, learner.cpus_per_learner, learner.device, learner.node_resource"
        rollout_keys = ("rollout.num_workers, rollout.cpus_per_worker, rollout.gpus_per_worker, "
                        "rollout.node_resource")
        self.learner_bundles: list[Bundle] = []
        self.rollout_bundles: list[Bundle] = []
        if learner is not None:
            for i in range(learner.num_learners):
                resources = learner_bundle(learner, self.learner_gpu)
                if self.colocated:  # the pair shares the GPU: the bundle holds one, not two
                    pair = {k: v for k, v in rollout_bundle(rollout).items() if k != "GPU"}
                    self.learner_bundles.append(Bundle(_merge(resources, pair), f"learner {i} + rollout worker {i}",
                                                       f"{learner_keys}, {rollout_keys}"))
                else:
                    self.learner_bundles.append(Bundle(resources, f"learner {i}", learner_keys))
        if rollout is not None and not self.colocated:
            self.rollout_bundles = [Bundle(rollout_bundle(rollout), f"rollout worker {i}", rollout_keys)
                                    for i in range(rollout.num_workers)]
        reward_bundles = []
        if reward is not None:  # no placement group (stateless workers), but they must fit too
            reward_keys = "reward.num_workers, reward.cpus_per_worker, reward.node_resource"
            reward_bundles = [Bundle(reward_bundle(reward), f"reward worker {i}", reward_keys)
                              for i in range(reward.num_workers)]
        check_resources(self.learner_bundles + self.rollout_bundles + reward_bundles, self.cfg.resource_wait_s)

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
        cfg = self.learner
        gpus = (COLOCATED_GPU_SHARE if self.colocated else 1.0) if self.learner_gpu else 0
        return {"num_cpus": cfg.cpus_per_learner, "num_gpus": gpus, "resources": label_resources(cfg.node_resource),
                "scheduling_strategy": self._strategy(self.learner_group, rank)}

    def rollout_options(self, rank: int) -> dict[str, Any]:
        cfg = self.rollout
        if self.colocated:
            gpus = COLOCATED_GPU_SHARE if self.learner_gpu else 0
            return {"num_cpus": cfg.cpus_per_worker, "num_gpus": gpus,
                    "resources": label_resources(cfg.node_resource),
                    "scheduling_strategy": self._strategy(self.learner_group, rank)}
        return {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker,
                "resources": label_resources(cfg.node_resource),
                "scheduling_strategy": self._strategy(self.rollout_group, rank)}

    @staticmethod
    def _strategy(group, rank: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)

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


def reward_options(cfg: "RewardConfig") -> dict[str, Any]:
    """Reward workers need no placement group: any node with free CPUs (and the label, if set)."""
    return {"num_cpus": cfg.cpus_per_worker, "resources": label_resources(cfg.node_resource)}
