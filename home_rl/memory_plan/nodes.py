"""The cluster a plan is for: its nodes' GPUs (count, memory) and RAM, from this machine, Ray, or a description."""
from __future__ import annotations

import dataclasses
import os

from home_rl.errors import ConfigError

GIB = 2 ** 30
# An actor may plan on 90% of its GPU or of its node's RAM: the allocators' fragmentation, and what the plan does not
# model (measured predictions are within a quarter of the truth on the CPU machine), need the rest.
USABLE = 0.9


@dataclasses.dataclass
class Node:
    gpus: int  # GPUs of the node
    gpu_gib: float  # memory of each GPU
    host_gib: float  # the node's RAM


@dataclasses.dataclass
class Cluster:
    nodes: list[Node]
    source: str  # where the description came from (local machine, Ray cluster, the command line)
    bf16: bool = True  # whether the learners' device trains in bfloat16 (a CPU without it falls back to fp32)

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)


def local_cluster() -> Cluster:
    """This machine: its RAM (MemTotal: the machine's size, not what other jobs leave free now) and GPUs."""
    import torch

    from home_rl.resources import bf16_supported

    gpus, gpu_gib = _local_gpus()
    # bf16 on GPUs is taken as given (every GPU the learners target has it): asking torch would start CUDA here
    bf16 = True if gpus else bf16_supported(torch.device("cpu"))
    return Cluster([Node(gpus, gpu_gib, _meminfo_gib("MemTotal"))], "this machine", bf16=bf16)


def _local_gpus() -> tuple[int, float]:
    """(count, GiB each) of this machine's GPUs from nvidia-smi: torch would create a CUDA context in the driver,
    which then holds GPU memory beside the learners for the whole run."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0, 0.0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        sizes = [float(x) / 1024 for x in out]  # MiB
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0, 0.0
    return len(sizes), min(sizes, default=0.0)


def ray_cluster(gpu_gib: float = 0.0) -> Cluster:
    """The connected Ray cluster's alive nodes: GPUs and RAM from Ray (memory + object store: the node's RAM as
    Ray divides it). Ray does not report GPU memory: `gpu_gib`, or 0 (unknown: GPU actors are not planned, a note
    says so; a wrong guess would refuse runs that fit)."""
    import ray

    here = ray.util.get_node_ip_address()
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n["Resources"]
        ram = (res.get("memory", 0.0) + res.get("object_store_memory", 0.0)) / GIB
        if n.get("NodeManagerAddress") == here:  # Ray's figure is what was free when the node started: this
            ram = _meminfo_gib("MemTotal")       # machine's own size says more (as for a local run)
        # the driver's node first: the plan places the driver and the CPU-only actors on node 0
        nodes.insert(0 if n.get("NodeManagerAddress") == here else len(nodes), Node(int(res.get("GPU", 0)), gpu_gib, ram))
    return Cluster(nodes, "the Ray cluster" + (f" ({gpu_gib:g} GiB GPUs)" if gpu_gib else ""), bf16=True)


def described_cluster(nodes: int, gpus_per_node: int, gpu_gib: float, host_gib: float) -> Cluster:
    if nodes < 1 or gpus_per_node < 0 or host_gib <= 0 or (gpus_per_node and gpu_gib <= 0):
        raise ConfigError(f"a described cluster needs --nodes >= 1, --host-gib > 0 and, with GPUs, --gpu-gib > 0 "
                          f"(got {nodes} nodes, {gpus_per_node} GPUs of {gpu_gib} GiB, {host_gib} GiB RAM)")
    return Cluster([Node(gpus_per_node, gpu_gib, host_gib) for _ in range(nodes)],
                   f"{nodes} node(s) of {gpus_per_node} x {gpu_gib:g} GiB GPUs, {host_gib:g} GiB RAM")


def current_cluster() -> Cluster:
    """Where a recipe runs: the Ray cluster it joined (RAY_ADDRESS, or a runtime already up) or this machine."""
    try:
        import ray

        if ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
            return ray_cluster()
    except ImportError:
        pass
    return local_cluster()


def _meminfo_gib(key: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / GIB
