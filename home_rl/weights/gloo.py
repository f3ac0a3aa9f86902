"""A CPU backend for vLLM's weight-transfer API: the trainer broadcasts over a gloo process group.

vLLM ships `nccl` (GPUs) and `ipc` (colocated GPUs); a CPU engine has neither. This backend has the same two
halves as vLLM's `nccl` one and registers them with vLLM's factories under the name "gloo", so the trainer side
(`WeightSender`) and the engines' side are one code path on both machine kinds: only `rollout.weight_transfer`
differs.

A round sends one bucket per gather group of the source (vLLM's `layerwise_groups`: a decoder layer, or the
tensors outside the layers), as one flat byte buffer: a fused layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj)
always arrives whole, in one `load_weights` call. The engine receives inside vLLM's layerwise reload session, like
the `nccl` backend: layers that receive nothing keep their weights.
"""
from __future__ import annotations

import dataclasses
import datetime
import re
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import torch
import torch.distributed as dist

from home_rl import vllm_names as vn

BACKEND = "gloo"
STORE_PREFIX = "home_rl_weights"


@dataclasses.dataclass(kw_only=True)
class GlooInitInfo(vn.WeightTransferInitInfo):
    """What an engine's worker needs to join the trainer's group (the worker's rank is rank_offset + its own)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600.0


@dataclasses.dataclass
class GlooTrainerInitInfo(vn.TrainerInitInfo):
    """The trainer's side: it hosts the rendezvous store at master_address:master_port as rank 0."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 600.0


@dataclasses.dataclass
class GlooUpdateInfo(vn.WeightTransferUpdateInfo):
    """One round: every tensor's name, dtype and shape in send order, and how many tensors each bucket holds."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_sizes: list[int]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes) == sum(self.bucket_sizes):
            raise ValueError(f"gloo weight update: {len(self.names)} names, {len(self.dtype_names)} dtypes, "
                             f"{len(self.shapes)} shapes and buckets of {sum(self.bucket_sizes)} tensors disagree")


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group of its own (not torch's default group, which a learner's DeepSpeed owns); rank 0 hosts the store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore(STORE_PREFIX, store), rank, world_size, timeout)


def bucket_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The bucket as one flat uint8 buffer (the tensors' bytes in order)."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def split_bytes(buffer: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    """The tensors of a received bucket, as views into its buffer."""
    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes):
        size = nbytes(shape, dtype)
        out.append(buffer[offset:offset + size].view(dtype).reshape(shape))
        offset += size
    return out


def nbytes(shape: list[int], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class GlooWeightTransferEngine(vn.WeightTransferEngine):
    """The engine's side, inside each vLLM worker: receives a round's buckets and loads them layer by layer."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.received: list[str] = []

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the trainer's group (a new one replaces the last: a restarted peer means a new group)."""
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = open_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        vn.initialize_layerwise_reload(self.model)
        self.received = []

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # no device to synchronise: loads are synchronous

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Receive every bucket of the round, loading each as it comes. A bucket that cannot load (an unknown name,
        part of a fused layer without its siblings) stops the loading; the rest of the round is still received, so
        the trainer's broadcasts never wait for an engine that stopped listening. Then the round is abandoned:
        layers already complete keep their new weights, the others their old ones, and the error is raised."""
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_transfer_engine was not called")
        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        fused = dict(getattr(self.model, "packed_modules_mapping", {}) or {})
        first, error = 0, None
        for size in update_info.bucket_sizes:
            names, shapes = update_info.names[first:first + size], update_info.shapes[first:first + size]
            kinds = dtypes[first:first + size]
            buffer = torch.empty(sum(nbytes(s, d) for s, d in zip(shapes, kinds)), dtype=torch.uint8)
            self.group.broadcast(buffer, 0).wait()
            first += size
            if error is not None:
                continue
            try:
                missing = missing_fused_parts(names, fused)
                if missing:
                    raise ValueError(f"the update lacks {', '.join(missing[:6])}, fused with what it sends of that "
                                     "layer: a fused layer loads whole or not at all")
                tensors = split_bytes(buffer, kinds, shapes)
                self.model.load_weights([(n, t.to(self.device)) for n, t in zip(names, tensors)])
                self.received += names
            except Exception as e:  # noqa: BLE001  raised below, after the last bucket
                error = e
        if error is not None:
            self._abandon()
            raise error

    def _abandon(self) -> None:
        """End the reload session, dropping what incomplete layers buffered (they keep their old weights)."""
        for layer in self.model.modules():
            info = vn.get_layerwise_info(layer)
            if info.can_load() and info.load_numel:
                info.load_numel, info.loaded_weights = 0, []
        self.finish_weight_update()

    def finish_weight_update(self) -> None:
        # vLLM logs "Failed to load weights" for each layer that received nothing: the ones meant to stay as they are
        with vn.quiet_layerwise_reload():
            vn.finalize_layerwise_reload(self.model, self.model_config)
        repack_tied_lm_heads(self.model, self.received)

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(vn.TrainerWeightTransferEngine):
    """The trainer's side: rank 0 of the group; drives the engines' update through the client while it broadcasts."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None) -> "GlooTrainerWeightTransferEngine":
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if not engine.is_sender:
            return engine
        workers = GlooInitInfo(master_address=init_info.master_address, master_port=init_info.master_port,
                               rank_offset=1, world_size=init_info.world_size, timeout_s=init_info.timeout_s)
        with ThreadPoolExecutor(max_workers=1) as pool:  # the engines wait in the rendezvous as the trainer does
            joined = pool.submit(client.init_weight_transfer_engine, dataclasses.asdict(workers))
            engine.group = open_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                      init_info.timeout_s)
            joined.result()
        return engine

    def send_weights(self) -> None:
        source = self.source
        groups = source.groups()
        meta = {m.name: m for m in source.metadata()}
        if not self.is_sender:
            for _ in source.iter_groups():
                pass
            return
        order = [meta[name] for group in groups for name in group]
        info = GlooUpdateInfo(names=[m.name for m in order], dtype_names=[str(m.dtype).split(".")[-1] for m in order],
                              shapes=[list(m.shape) for m in order], bucket_sizes=[len(g) for g in groups])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:  # the engines receive in update_weights while this thread broadcasts: both meet in each broadcast
            received = pool.submit(self.client.update_weights, dataclasses.asdict(info))
            for _, tensors in source.iter_groups():
                if received.done():  # the engines' call ended before the round did: it failed
                    received.result()
                self.group.broadcast(bucket_bytes(tensors), 0).wait()
            received.result()
        finally:
            pool.shutdown(wait=False)  # a failed broadcast leaves the engines' call hanging: never join it
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def repack_tied_lm_heads(model: torch.nn.Module, names: list[str]) -> int:
    """On CPU, re-pack LM heads tied to an embedding that was just reloaded: the CPU build keeps its own packed
    copy of the head's weight, which reloading the embedding leaves stale."""
    if not vn.is_cpu() or not any(re.search(r"embed_tokens|wte|word_embeddings", n) for n in names):
        return 0
    embeddings = [m for m in model.modules()
                  if isinstance(m, vn.VocabParallelEmbedding) and not isinstance(m, vn.ParallelLMHead)]
    repacked = 0
    for head in model.modules():
        if isinstance(head, vn.ParallelLMHead) and any(head.weight is e.weight for e in embeddings):
            vn.repack_cpu_linear(head)
            repacked += 1
    return repacked


def missing_fused_parts(names: list[str], packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """Names of the fused siblings that do not come with `names` (q_proj without k_proj and v_proj, ...)."""
    given, missing = set(names), []
    for name in names:
        parts = name.split(".")
        if len(parts) < 2:
            continue
        for siblings in packed_modules_mapping.values():
            if parts[-2] in siblings and len(siblings) > 1:  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
                for sibling in siblings:
                    other = ".".join(parts[:-2] + [sibling, parts[-1]])
                    if other not in given and other not in missing:
                        missing.append(other)
    return missing


def register() -> None:
    """Make "gloo" a backend of vLLM's weight-transfer factories in this process (idempotent)."""
    for factory, engine in ((vn.WeightTransferEngineFactory, GlooWeightTransferEngine),
                            (vn.WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        try:
            factory.register_engine(BACKEND, engine)
        except ValueError:  # registered already
            pass
