"""The trainer's side of the weight plane: versions of the changed tensors, held where they were made, sent
straight to every rollout engine through vLLM's weight-transfer API.

    sender = WeightSender()
    sender.stage(3, named_tensors)                # version 3: the think expert's tensors (learner rank 0 holds them)
    sender.connect(engines, 1, "gloo")            # RolloutWorker actors, workers per engine, backend (nccl on GPUs)
    report = sender.send(3)                       # {"tensors", "bytes", "buckets", "seconds", "version"}

A pool that serves a LoRA think expert connects with the `adapter` backend: a version is the adapter's tensors
(megabytes), put in Ray's object store once and loaded by each engine in place of the last
(home_rl/rollout/adapter.py); vLLM's weight-transfer API moves model weights, not adapters.

A learner's rank 0 holds one (GRPO: `LearnerGroup.weight_sender()`), the HomeModelActor another (a view swap in
the router stage and evaluation), a test a third. The driver never holds weights: a `RolloutPool` calls `connect`
and `send` through an `ActorSender`, and a restarted engine is filled again from the sender's last sent version.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import torch

from home_rl import vllm_names as vn
from home_rl.weights import gloo

BACKENDS = ("gloo", "nccl")


class Sender(Protocol):
    """What a RolloutPool needs of the side that holds the weights."""

    def connect(self, engines: Sequence[Any], workers_per_engine: int, backend: str) -> None: ...

    def send(self, version: int) -> dict: ...


class StagedWeights(vn.WeightSource):
    """vLLM's WeightSource over staged versions: each a list of buckets, one per decoder layer (vLLM's
    `layerwise_groups`), so no bucket ever holds part of a fused layer. `select(v)` picks what a round sends."""

    def __init__(self):
        self.device = torch.device("cpu")  # where a round's tensors go before they are sent (the sender's GPU for nccl)
        self.versions: dict[int, list[list[tuple[str, torch.Tensor]]]] = {}
        self.selected: Optional[int] = None
        self.lock = threading.Lock()  # a learner stages from its training thread while its weights thread sends

    def stage(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pairs = {name: t.detach() for name, t in named_tensors}
        buckets = [[(name, pairs[name]) for name in group] for group in vn.layerwise_groups(list(pairs))]
        with self.lock:
            self.versions[version] = buckets

    def stage_unchanged(self, version: int, of: int) -> None:
        """`version` holds the same tensors as `of` (a step without an update; none if `of` is the view on disk)."""
        with self.lock:
            self.versions[version] = self.versions.get(of, [])

    def select(self, version: int) -> None:
        with self.lock:
            if version not in self.versions:
                raise KeyError(f"weights version {version} is not staged here (staged: {sorted(self.versions)})")
            self.selected = version

    def drop_before(self, version: int) -> None:
        """Forget versions older than `version` (the engines hold `version`; a refill sends it again)."""
        with self.lock:
            for v in [v for v in self.versions if v < version]:
                del self.versions[v]

    def buckets(self) -> list[list[tuple[str, torch.Tensor]]]:
        with self.lock:
            return self.versions[self.selected]

    def metadata(self) -> list:
        return [vn.ParamMeta(name, t.dtype, tuple(t.shape)) for bucket in self.buckets() for name, t in bucket]

    def groups(self) -> list[list[str]]:
        return [[name for name, _ in bucket] for bucket in self.buckets()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            for name, t in bucket:
                yield name, t.to(self.device)

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        for bucket in self.buckets():
            yield [name for name, _ in bucket], [t.to(self.device) for _, t in bucket]


class EngineClient:
    """vLLM's VLLMWeightSyncClient protocol over RolloutWorker actors: each call goes to every engine at once.
    Engine i's workers take ranks 1 + i * workers_per_engine onwards (vLLM's backends give every engine offset 1)."""

    def __init__(self, engines: Sequence[Any], workers_per_engine: int):
        self.engines, self.workers_per_engine = list(engines), workers_per_engine
        self.version = 0  # what finish_weight_update stamps on the engines

    def _all(self, method: str, *args_per_engine: list) -> None:
        import ray

        calls = [getattr(e, method).remote(*(a[i] for a in args_per_engine)) for i, e in enumerate(self.engines)]
        ray.get(calls)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        infos = [{**init_info, "rank_offset": init_info["rank_offset"] + i * self.workers_per_engine}
                 for i in range(len(self.engines))]
        self._all("init_weight_transfer_engine", infos)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("update_weights", [update_info] * len(self.engines))

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        self._all("finish_weight_update", [self.version] * len(self.engines))


class WeightSender:
    """The trainer's side of vLLM's weight-transfer API in the process that holds the weights (module docstring)."""

    def __init__(self):
        self.source = StagedWeights()
        self.engine = None
        self.client: Optional[EngineClient] = None
        self.adapter_engines: Optional[list] = None  # RolloutWorker actors serving an adapter (the `adapter` backend)

    def stage(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.source.stage(version, named_tensors)

    def stage_unchanged(self, version: int, of: int) -> None:
        self.source.stage_unchanged(version, of)

    def connect(self, engines: Sequence[Any], workers_per_engine: int = 1, backend: str = "gloo") -> None:
        """One group of this process (rank 0) and every engine's workers; a new group replaces the last. `backend`:
        gloo (tensors leave from host memory) or nccl (from this process's GPU)."""
        from home_rl.cluster import rendezvous_address
        from home_rl.rollout.adapter import ADAPTER_BACKEND

        if backend not in (*BACKENDS, ADAPTER_BACKEND):
            raise ValueError(f"rollout.weight_transfer={backend!r}: one of {', '.join(BACKENDS)}")
        self.shutdown()
        if backend == ADAPTER_BACKEND:
            self.adapter_engines = list(engines)
            return
        self.adapter_engines = None
        gloo.register()
        on_gpu = backend == "nccl"  # vLLM's nccl backend broadcasts from this process's GPU
        self.source.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.client = EngineClient(engines, workers_per_engine)
        address, port = rendezvous_address()
        fields = dict(master_address=address, master_port=port, world_size=1 + len(engines) * workers_per_engine,
                      rank=0)
        info = gloo.GlooTrainerInitInfo(**fields) if backend == "gloo" else vn.NCCLTrainerInitInfo(**fields)
        self.engine = vn.WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=self.source)

    def send(self, version: int) -> dict:
        """Send staged `version` to every connected engine; they adopt it as their weights version."""
        if self.engine is None and self.adapter_engines is None:
            raise RuntimeError("WeightSender.send before connect")
        start = time.perf_counter()
        self.source.select(version)
        buckets = self.source.buckets()
        if self.adapter_engines is not None:
            self._send_adapter(version, {name: t for bucket in buckets for name, t in bucket})
        elif buckets:  # none: the view on disk, which the engines hold
            self.client.version = version
            self.engine.send_weights()
        self.source.drop_before(version)
        return {"version": version, "tensors": sum(map(len, buckets)), "buckets": len(buckets),
                "bytes": sum(t.numel() * t.element_size() for b in buckets for _, t in b),
                "seconds": time.perf_counter() - start}

    def _send_adapter(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        import ray

        if not tensors:  # the adapter on disk, which the engines were started with
            return
        shared = ray.put(tensors)  # one copy in the object store, whatever the number of engines
        ray.get([engine.load_adapter.remote(shared, version) for engine in self.adapter_engines])

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class ActorSender:
    """A Sender that lives in an actor exposing `connect_engines` and `send_weights` (learner rank 0, the
    HomeModelActor): the pool's calls go to it, the weights never pass through the caller."""

    def __init__(self, actor: Any):
        self.actor = actor

    def connect(self, engines: Sequence[Any], workers_per_engine: int, backend: str) -> None:
        from home_rl.errors import ray_get

        ray_get(self.actor.connect_engines.remote(list(engines), workers_per_engine, backend))

    def send(self, version: int) -> dict:
        from home_rl.errors import ray_get

        return ray_get(self.actor.send_weights.remote(version))
