"""What one actor asks the Ray cluster for: the `resources` section of every actor group's config.

    learner:  {resources: {cpus: 4, node_resource: learner}}
    rollout:  {resources: {cpus: 4, gpus: 2, node_resource: rollout}}
    reward:   {resources: {cpus: 1}}
    actor:    {resources: {cpus: 2, gpus: 1}}        # the router stage's HomeModelActor

Node types are marked with custom Ray resources (`ray start --resources '{"rollout": 1}'`). An actor
whose section names one asks for a sliver of it (LABEL_SHARE): it runs only on such nodes, while
CPUs and GPUs, not the label, decide how many share a node.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from home_rl.errors import ConfigError

CPU_BF16_ENV = "HOME_RL_CPU_BF16"  # "0": treat this CPU as one without bfloat16 (learners and engines in float32)
LABEL_SHARE = 0.001  # how much of its node label resource an actor asks for (a label, not a count)


@dataclasses.dataclass
class Resources:
    cpus: float = 1.0  # logical Ray CPUs each actor asks for
    gpus: float = 0.0  # GPUs each actor asks for (learners: 0 lets learner.device decide, one each on GPU clusters; rollout workers: their tensor_parallel_size)
    threads: int = 0  # torch / OpenMP threads per actor (0: the group's default: its CPUs, or for rollout workers the machine's cores shared among them)
    node_resource: str = ""  # custom Ray resource marking the nodes this group may use (e.g. rollout); "": any node
    cores: str = ""  # CPU cores each actor's process is pinned to (e.g. "0", "2-3,6"), dedicating them as a GPU is dedicated; "": wherever the OS schedules it

    def __post_init__(self):
        if self.cpus < 0 or self.gpus < 0 or self.threads < 0:
            raise ConfigError(f"resources.cpus, .gpus and .threads must be >= 0, got {self.cpus}, {self.gpus}, "
                              f"{self.threads}")
        if self.cores:
            self.core_ids()  # raises on a bad list

    def core_ids(self) -> list[int]:
        """`cores` as a list of core ids ("0,2-3" -> [0, 2, 3])."""
        ids = []
        for part in self.cores.split(","):
            lo, _, hi = part.strip().partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
                raise ConfigError(f"resources.cores must list core ids like '0' or '2-3,6', got {self.cores!r}")
            ids += list(range(int(lo), int(hi or lo) + 1))
        return ids

    def pin(self) -> None:
        """Pin this process (and the threads it starts from now on) to `cores`; a no-op when empty."""
        if self.cores:
            import os

            os.sched_setaffinity(0, self.core_ids())

    def label(self) -> dict[str, float]:
        return {self.node_resource: LABEL_SHARE} if self.node_resource else {}

    def bundle(self, gpus: float | None = None) -> dict[str, float]:
        """This actor's placement-group bundle (`gpus` overrides the configured count, e.g. a learner's GPU)."""
        gpus = self.gpus if gpus is None else gpus
        return {"CPU": self.cpus, **({"GPU": float(gpus)} if gpus else {}), **self.label()}

    def actor_options(self, gpus: float | None = None) -> dict[str, Any]:
        """Ray actor options without a placement group: what the actor asks of any node."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus if gpus is None else gpus, "resources": self.label()}

    def num_threads(self, default: int = 0) -> int:
        """Threads to use: `threads`, else one per pinned core, else `default`, else the actor's whole CPUs
        (at least 1)."""
        return self.threads or (len(self.core_ids()) if self.cores else 0) or default or max(1, int(self.cpus))


def resources_field(**defaults: Any) -> Any:
    """A `resources` config field with this group's defaults."""
    return dataclasses.field(default_factory=lambda: Resources(**defaults))


def bf16_supported(device: Any) -> bool:
    """Whether `device` (a torch.device) computes in bfloat16 natively. A CPU without AVX-512-BF16 or AMX
    emulates it: its learners train and its vLLM engines decode in float32 instead (vLLM's CPU engine
    decoded 3x slower in bfloat16 than in float32 on such a CPU)."""
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if os.environ.get(CPU_BF16_ENV) == "0":  # run as a CPU without bfloat16 does, on one that has it
        return False
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def compute_dtype(dtype: Any, device: Any) -> Any:
    """The dtype to compute in on `device` for weights stored in `dtype`: float32 for bfloat16 where the device
    only emulates it (a forward of the embedded default's router features took about 0.8 s a prompt so)."""
    import torch

    return torch.float32 if dtype == torch.bfloat16 and not bf16_supported(torch.device(device)) else dtype
