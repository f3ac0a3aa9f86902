"""One learner: a rank of a torch.distributed group running a DeepSpeed engine over a dense or HOME model.

`LearnerGroup` runs L of these as Ray actors and calls every method on every rank at once: under
ZeRO-3 each forward, backward and weight gather is a collective, so all ranks must make the same
calls with the same number of micro-batches. Methods return results on every rank (training
metrics as additive shares) or on rank 0 only (gathered weights).
"""
from __future__ import annotations

import collections
import logging
import os
import re
import time
from typing import Any, Optional

import ray
import torch

from home_rl.console import capture_output
from home_rl.errors import HomeRLError
from home_rl.learner import forward
from home_rl.learner.batch import MicroBatch, Sequence, collate, collate_shared
from home_rl.learner.plan import PlannedMicroBatch, check_plan, micro_batches
from home_rl.learner.config import LearnerConfig, frozen_copy_map, trainable_patterns
from home_rl.learner.losses import LossInputs, resolve_loss, router_ce
from home_rl.learner.optim import WarmupSchedule, param_groups, select_trainable
from home_rl.resources import bf16_supported

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"  # the DeepSpeed tag inside a checkpoint folder
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def deepspeed_config(cfg: LearnerConfig, dtype: torch.dtype, world_size: int) -> dict:
    """The DeepSpeed config for `cfg` (the CPU-tested recipe; the same on GPU)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):  # the same reason as below: DeepSpeed's 5e8-element buckets outsize a small model
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if cfg.zero_stage == 3:
        zero.update(overlap_comm=False, contiguous_gradients=True, stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=True,
                    # DeepSpeed's default bucket (5e8 elements) is a 1-2 GB gradient buffer per rank,
                    # larger than a small model: 5e7 keeps it at 100-200 MB.
                    reduce_bucket_size=int(5e7))
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # The learner owns accumulation: every backward accumulates, every step() is a boundary,
        # so a step may hold any number of micro-batches.
        "managed_gradient_accumulation": False,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": 0.0 if clips_itself(cfg, dtype) else cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def clips_itself(cfg: LearnerConfig, dtype: torch.dtype) -> bool:
    """Whether the learner clips gradients itself: DeepSpeed clips fp32 ZeRO-0 gradients but drops their norm
    (every other mode reports it), so there the learner clips in its optimizer's pre-step hook, on the reduced
    gradients, and keeps the norm for the step's metrics."""
    return cfg.zero_stage == 0 and dtype == torch.float32


class MicroBatchPlanError(HomeRLError):
    """A rank's micro-batch plan does not fit the sequences it was sent with."""


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, cfg: dict, threads: int):
        capture_output(f"learner-{rank}")  # first: DeepSpeed's and torch's output goes to the run's logs/
        self.rank, self.world_size = rank, world_size
        self.cfg = LearnerConfig(**cfg)
        self.cfg.resources.pin()  # before torch starts its threads: they inherit the cores
        torch.set_num_threads(max(1, threads))
        self.engine = None
        self.sender = None  # rank 0's home_rl.weights.WeightSender: the versions the rollout engines load

    # ------------------------------------------------------------------ set-up

    def address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port for the process group's rendezvous."""
        from home_rl.cluster import rendezvous_address

        return rendezvous_address()

    def setup(self, master_addr: str, master_port: int, model_path: str, dtype: str, total_steps: int) -> dict:
        """Join the process group, load the model, freeze what does not train, start the DeepSpeed engine."""
        from home_rl.learner.model_io import load_for_training, torch_dtype

        start = time.perf_counter()
        use_cuda = torch.cuda.is_available() and self.cfg.device != "cpu"
        if not use_cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA probing
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed

        if use_cuda:
            torch.cuda.set_device(0)  # Ray gives each learner actor one GPU: CUDA_VISIBLE_DEVICES holds just it
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

        self.dtype = torch_dtype(dtype)
        if self.dtype == torch.bfloat16 and not bf16_supported(self.device):
            log.warning("bfloat16 is not supported on this %s: the learner trains in float32", self.device.type)
            self.dtype = torch.float32
        self.model_path = model_path
        ds_config = deepspeed_config(self.cfg, self.dtype, self.world_size)
        model, self.is_home = load_for_training(model_path, self.dtype, ds_config, list(self.cfg.frozen_copies))
        self.frozen_copies = tuple(frozen_copy_map(self.cfg.frozen_copies))
        never = tuple(f"*.experts.{name}.*" for name in self.frozen_copies)
        trainable = select_trainable(model, trainable_patterns(self.cfg.trainable), never)
        if self.cfg.gradient_checkpointing:
            base = model.base if self.is_home else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        betas = tuple(self.cfg.betas)
        optimizer = torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr, betas=betas,
                                      eps=self.cfg.eps)
        schedule = WarmupSchedule(self.cfg.warmup_steps, total_steps, self.cfg.lr_schedule, self.cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.own_grad_norm: Optional[float] = None
        if clips_itself(self.cfg, self.dtype):
            params = [p for p in model.parameters() if p.requires_grad]
            limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")

            def clip(optimizer, args, kwargs):
                self.own_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))

            optimizer.register_step_pre_hook(clip)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        counts = {"trainable": 0, "total": 0}
        for p in self.engine.module.parameters():
            n = int(getattr(p, "ds_numel", p.numel()))
            counts["total"] += n
            counts["trainable"] += n if p.requires_grad else 0
        return {"rank": self.rank, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "is_home": self.is_home, "trainable_names": len(trainable), **counts,
                "setup_s": round(time.perf_counter() - start, 2)}

    @property
    def module(self):
        return self.engine.module

    # ------------------------------------------------------------------ compute

    def _micro_batches(self, shard: list[Sequence], plan: list, num_micro: int) -> list[PlannedMicroBatch]:
        """The driver's plan for this rank, checked against the shard before any collective: every rank learns
        whether any refused (one tiny all-reduce), so a refusal stops all ranks instead of leaving the others
        waiting in ZeRO-3's gathers."""
        cfg = self.cfg
        problem = check_plan(shard, plan, num_micro, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                             cfg.shared_prefix)
        if self.world_size > 1:
            refused = torch.tensor([0 if problem is None else 1], device=self.device)
            torch.distributed.all_reduce(refused, op=torch.distributed.ReduceOp.MAX)
            if problem is None and int(refused.item()):
                problem = "another rank refused its micro-batch plan"
        if problem is not None:
            raise MicroBatchPlanError(f"learner rank {self.rank}: the micro-batch plan does not fit its shard: {problem}")
        return micro_batches(shard, plan, num_micro)

    def _collate(self, planned: PlannedMicroBatch) -> MicroBatch:
        """One micro-batch on this learner's device: shared-prefix rows, or one sequence a row (also when no
        row holds more than one: the plain causal pass is the same computation, without a 4D mask)."""
        if any(len(row) > 1 for row in planned.rows):
            return collate_shared(planned.rows, pad_id=0).to(self.device)
        return collate(planned.sequences, pad_id=0).to(self.device)

    def _forward(self, mb: MicroBatch, with_entropy: bool, temperature: float, entropy_grad: bool = True):
        return forward.log_probs(self.engine, self.module, mb, self.is_home, with_entropy, temperature, entropy_grad)

    def train_step(self, shard: list[Sequence], plan: list, num_micro: int, totals: dict, loss: Any = "sft",
                   router_loss_weight: float = 0.0, temperature: float = 1.0) -> dict:
        """Forward/backward over `num_micro` micro-batches of this rank's shard (`plan`, then fillers), then one
        optimizer step; every pass at `temperature` (the sampling temperature of the rollouts it trains on).

        `totals` are the whole step's counts (tokens, sequences, labelled) over every rank.
        Returned metrics are this rank's additive shares; the group sums them.
        """
        spec = resolve_loss(loss)
        if router_loss_weight and not self.is_home:
            raise ValueError("a router loss needs a HOME model")
        self.engine.train()
        lr = self.engine.get_lr()[0]
        sums: dict[str, float] = collections.defaultdict(float)
        start = time.perf_counter()
        for planned in self._micro_batches(shard, plan, num_micro):
            mb = self._collate(planned)
            log_probs, entropy = self._forward(mb, spec.needs_entropy, temperature, spec.entropy_grad)
            inputs = LossInputs(log_probs=log_probs, entropy=entropy, loss_mask=mb.loss_mask, token_data=mb.token_data,
                                seq_data=mb.seq_data, global_tokens=totals["tokens"],
                                global_sequences=totals["sequences"], world_size=self.world_size)
            share, metrics = spec.fn(inputs)
            if router_loss_weight:
                logits = mb.per_sequence_rows(self.module.route_logits(**mb.router_inputs()))
                router_share, router_metrics = router_ce(logits, mb.router_labels.to(logits.device), totals["labelled"])
                share = share + router_loss_weight * router_share
                metrics = {**metrics, **router_metrics}
            # DeepSpeed averages gradients over ranks; the shares are already global, so undo the mean.
            self.engine.backward(share * self.world_size, scale_wrt_gas=False)
            sums["loss"] += share.item()
            for key, value in metrics.items():  # shares add up; a `*_max` metric is a maximum
                sums[key] = max(sums[key], float(value)) if key.endswith("_max") and key in sums else \
                    sums[key] + float(value)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = self.own_grad_norm if norm is None else norm
        return {**sums, "grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr,
                "compute_s": time.perf_counter() - start, "step": int(self.engine.global_steps)}

    @torch.no_grad()
    def log_probs(self, shard: list[Sequence], plan: list, num_micro: int, temperature: float = 1.0,
                  with_entropy: bool = False) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Per sequence of the shard (in order): log-probs of its response tokens, and their entropies."""
        self.engine.eval()
        out: list = [None] * len(shard)
        for planned in self._micro_batches(shard, plan, num_micro):
            mb = self._collate(planned)
            log_probs, entropy = self._forward(mb, with_entropy, temperature)
            lp = mb.per_sequence(log_probs)
            ent = mb.per_sequence(entropy) if with_entropy else [None] * len(lp)
            for i, idx in enumerate(planned.indices):
                out[idx] = (lp[i].cpu(), None if ent[i] is None else ent[i].cpu())
        return out

    @torch.no_grad()
    def logits(self, shard: list[Sequence], plan: list, num_micro: int) -> list[torch.Tensor]:
        """Per sequence: the logits [response tokens, vocab] that predict its response (for checks)."""
        self.engine.eval()
        out: list = [None] * len(shard)
        for planned in self._micro_batches(shard, plan, num_micro):
            mb = self._collate(planned)
            logits = self.engine(**forward.model_inputs(self.module, mb, self.is_home)).logits.float()
            for idx, values in zip(planned.indices, forward.sequence_logits(logits, mb)):
                out[idx] = values.cpu()
        return out

    # ------------------------------------------------------------------ weights

    def weight_chunks(self, view: Optional[str], only_trainable: bool) -> list[list[str]]:
        """Parameter names to gather, one list per decoder layer, then one for everything else.

        `view` (HOME models): only the parameters of that expert's view. Frozen working copies
        (e.g. a KL reference expert) are never part of a view.
        """
        by_layer: dict[int, list[str]] = collections.defaultdict(list)
        rest: list[str] = []
        for name, p in self.module.named_parameters():
            if only_trainable and not p.requires_grad:
                continue
            if view is not None and self._view_name(name, view) is None:
                continue
            m = _LAYER.search(name)
            (by_layer[int(m.group(1))] if m else rest).append(name)
        chunks = [by_layer[i] for i in sorted(by_layer)]
        return chunks + ([rest] if rest else [])

    def _view_name(self, name: str, view: Optional[str]) -> Optional[str]:
        if view is None:
            return name
        if not self.is_home:
            raise ValueError(f"view={view!r} needs a HOME model; this learner holds a dense one")
        from home_rl.model import view_name

        return view_name(name, view)

    def gather(self, names: list[str], view: Optional[str] = None) -> list[tuple[str, torch.Tensor]]:
        """Full tensors of `names` (one layer's worth), under `view`'s names, on rank 0 (empty on others).

        Every rank must call this with the same names: ZeRO-3 gathers collectively.
        """
        import deepspeed

        params = dict(self.module.named_parameters())
        chosen = [params[n] for n in names]
        with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
            if self.rank != 0:
                return []
            return [(self._view_name(n, view), p.detach().to("cpu", copy=True)) for n, p in zip(names, chosen)]

    def merged_adapter(self, names: list[str], view: str) -> list[tuple[str, torch.Tensor]]:
        """The projections a layer's adapter tensors `names` adapt, with the adapter merged, under `view`'s names, on
        rank 0 (empty on others): the fast expert's weights and the adapter are gathered, then merged in float32."""
        from home_rl.model import FAST
        from home_rl.model.lora_expert import LoraSpec, merge_adapter

        base = sorted({n.replace(f".experts.{view}.", f".experts.{FAST}.").split(".lora_")[0] + ".weight"
                       for n in names})
        fast, adapter = self.gather(base, FAST), self.gather(names, view)
        if self.rank != 0:
            return []
        return list(merge_adapter(dict(fast), dict(adapter), LoraSpec.from_home_config(self.module.home_config)).items())

    def stage_weights(self, version: int, view: Optional[str], only_trainable: bool, changed: bool = True,
                      keep_from: int = 0, merge_adapter: bool = False) -> None:
        """Gather the served tensors (a decoder layer at a time, every rank) and keep them on rank 0 as `version`,
        for the rollout engines; `changed` False: the same tensors as version - 1 (a step without an update).
        Versions older than `keep_from` are dropped first, so they never share host memory with the new one."""
        if self.rank == 0:  # only rank 0 imports vLLM's weight-transfer API (a quarter of a GB)
            from home_rl.weights import WeightSender

            self.sender = self.sender or WeightSender()
            if not changed:
                self.sender.stage_unchanged(version, version - 1)
            self.sender.source.drop_before(keep_from)
        if changed:
            gather = self.merged_adapter if merge_adapter else self.gather
            pairs = [pair for names in self.weight_chunks(view, only_trainable) for pair in gather(names, view)]
            if self.rank == 0:
                self.sender.stage(version, pairs)

    # On their own thread, so that rank 0 sends a version while the group trains the next (asynchronous rollouts);
    # they touch only rank 0's staged copies, never a collective of the learners' group.
    @ray.method(concurrency_group="weights")
    def connect_engines(self, engines: list, workers_per_engine: int, backend: str) -> None:
        from home_rl.weights import WeightSender

        self.sender = self.sender or WeightSender()
        self.sender.connect(engines, workers_per_engine, backend)

    @ray.method(concurrency_group="weights")
    def send_weights(self, version: int) -> dict:
        return self.sender.send(version)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """Engine, optimiser and LR-schedule state of every rank into `folder` (all ranks call it)."""
        self.engine.save_checkpoint(folder, tag=ENGINE_TAG)

    def load_checkpoint(self, folder: str) -> int:
        path, _ = self.engine.load_checkpoint(folder, tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint in {folder}")
        return int(self.engine.global_steps)

    def save_model(self, out_dir: str) -> Optional[str]:
        """The trained model as a checkpoint of the input's kind (dense folder or HOME), written by rank 0."""
        from home_rl.learner.model_io import write_trained

        if self.cfg.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # layer by layer onto rank 0
        else:
            state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if self.rank != 0:
            return None
        return str(write_trained(state, self.model_path, self.module, self.is_home, out_dir, self.dtype,
                                 drop_experts=self.frozen_copies))

    def peak_rss_gb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux

    def barrier(self) -> None:
        torch.distributed.barrier()
