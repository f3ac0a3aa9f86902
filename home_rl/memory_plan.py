"""Memory you can plan: every actor's peak memory, predicted from the model's config.json and the run's config.

Nothing is loaded and nothing starts: the model is built on the `meta` device (shapes, no storage) to count
its parameters exactly, by what they are to the learner (trainable, frozen, frozen copies such as think_ref,
vision tower), and the run's config says how they are held:

    learner   weights (frozen copies included) in the training dtype, gradients of what trains, AdamW states
              (16-bit training: fp32 master + m + v, 12 bytes a parameter; fp32: m + v, 8 bytes), each divided
              by the ZeRO stage's partitioning over num_learners; under ZeRO-3 the parameters gathered at
              once (at least the largest decoder layer); DeepSpeed's gradient buckets; the activations of the largest micro-batch by tokens
              (with or without gradient checkpointing); the logits of the kept positions; a process baseline;
              and the host RAM of loading (ZeRO-3: the partition + one layer, stages 0-2: the whole model)
    rollout   the view's weights, the KV cache (rollout.kv_cache_gib on CPU, gpu_memory_utilization of the GPU
              on GPUs), the vision encoder's buffers, a baseline
    driver    a baseline, plus the export of the think view (the HOME checkpoint loaded once in its own dtype)
    host      per node, everything placed there (the placement the config implies: home_rl/cluster.py)

    plan = plan_for_config(cfg, recipe="grpo_think")        # the local machine, a Ray cluster, or Cluster(...)
    plan.fits, plan.refusal(), [a.predicted_gib for a in plan.actors]

The constants below were measured on the 2-core CPU machine (peak RSS, VmHWM, of the actor processes:
benchmarks/memory_plan.py prints prediction against measurement for the embedded default).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from home_rl.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2 ** 30
ZERO_STAGES = (0, 1, 2, 3)

# ----------------------------------------------------------------------------- constants (why each is what it is)

# A learner actor with torch, deepspeed, transformers and verl imported, before any weight: VmHWM of a bare Ray
# actor importing the same modules, 0.52 GiB (benchmarks/memory_plan.py, case "baseline").
LEARNER_BASELINE_GIB = 0.52
# A vLLM rollout actor before weights and KV cache (vLLM's import, its engine core, the CPU build's buffers): the
# smollm2 view's worker peaked at 3.13 GiB with its 0.25 GiB of bf16 weights and its 2 GiB KV cache (allocated
# zeroed, so resident from the start).
ROLLOUT_BASELINE_GIB = 0.85
# The driver: Ray's client, the processor and the data rows. A tiny-model GRPO driver ran at 0.49 GB RSS and the
# benchmark's driver (the same imports) at 0.65 GB; a real data set's rows add to it.
DRIVER_BASELINE_GIB = 0.8
# A reward worker: Ray's worker, math-verify and its sandbox processes (small; not the memory that matters).
REWARD_WORKER_GIB = 0.4
# CUDA context, NCCL and the caching allocator's slack of a GPU process (no GPU here to measure: the usual
# figure for recent CUDA, ~1 GiB of context plus fragmentation).
GPU_CONTEXT_GIB = 1.5
# vLLM's activation reserve on a GPU (its profile run, sampler and CUDA graphs) out of gpu_memory_utilization.
VLLM_GPU_ACTIVATIONS_GIB = 2.0
# What one decoder layer saves for backward per token, in elements: the residual stream, both norms' outputs,
# q, the attention output and o_proj's input (about 8 x hidden), k and v (2 x kv_dim), and the MLP's gate, up,
# activation and product (4 x intermediate). Measured on smollm2 HOME (hidden 576, MLP 1536, 30 layers, fp32, ZeRO-0):
# each 256-token row of a micro-batch raised the peak by 0.535 GiB, with gradient checkpointing by 0.24 GiB; the
# difference, 0.295 GiB, is what checkpointing does not keep: 0.29 GiB as counted here (11.1 k elements a token).
ACT_HIDDEN_ELEMS, ACT_MLP_ELEMS = 8, 4
# With gradient checkpointing each layer keeps only its input (hidden elements per token); one layer at a
# time is recomputed whole during backward.
CKPT_HIDDEN_ELEMS = 1
# fp32 [positions, vocab] tensors at the peak for the logits of the kept positions, in units of one copy: the
# logits, the loss's and the entropy metric's softmax-sized intermediates, the gradient of the logits and the LM
# head's backward. Measured on smollm2 (vocab 49152, 160 kept positions a row): with gradient checkpointing a row
# added 0.24 GiB at the peak, 0.03 GiB of it activations: about 6 copies of its logits.
LOGIT_COPIES = 6
# DeepSpeed's gradient buckets: ZeRO 1-3 reduce in buckets of 5e7 elements (deepspeed_config sets it), one bucket
# and its flattened copy; stage 0 all-reduces a flattened copy of every gradient (its buckets are 5e8 elements).
REDUCE_BUCKET_ELEMS = int(5e7)
REDUCE_BUCKET_COPIES = 2
ALLREDUCE_BUCKET_ELEMS = int(5e8)
# ZeRO-3 prefetches parameters in buckets of stage3_prefetch_bucket_size (DeepSpeed's default 5e7 elements).
PREFETCH_BUCKET_ELEMS = int(5e7)
# ZeRO-3 keeps up to stage3_max_live_parameters (DeepSpeed's default 1e9) gathered parameters resident, and does not
# release one reused within stage3_max_reuse_distance (1e9): a model under 1e9 parameters stays gathered whole
# between forward and backward (measured: at the same micro-batch, ZeRO-3's smollm2 learners peaked 1.5 GiB above
# ZeRO-0's, although their weights were partitioned in two).
MAX_LIVE_PARAMS = int(1e9)


# Tokens of one image at Qwen2.5-VL's usual cap (max_pixels 1280 x 28 x 28), and vLLM's encoder cache budget in
# tokens (its max_num_batched_tokens default): the multimodal buffers of a rollout engine, small beside its KV cache.
IMAGE_TOKENS, ENCODER_CACHE_TOKENS = 1280, 8192
# An actor may plan on 90% of its GPU or of its node's RAM: the allocators' fragmentation, and what the plan does not
# model (measured predictions are within a quarter of the truth on the CPU machine), need the rest.
USABLE = 0.9


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class ActorPlan:
    role: str  # learner | rollout | reward | driver | router trainer | host node N
    count: int  # how many such actors
    device: str  # cpu | cuda | host (a node's RAM)
    predicted_gib: float  # the peak of one of them
    available_gib: float  # what one of them may use: USABLE of a GPU, or of its node's RAM
    parts: dict[str, float]  # GiB per part of the prediction (weights, gradients, optimizer, activations, ...)

    @property
    def fits(self) -> bool:
        return self.predicted_gib <= self.available_gib

    def row(self) -> dict:
        return {"role": self.role, "count": self.count, "device": self.device,
                "predicted_gib": round(self.predicted_gib, 2), "available_gib": round(self.available_gib, 2),
                "fits": self.fits}


@dataclasses.dataclass
class MemoryPlan:
    actors: list[ActorPlan]
    advice: list[str]  # what would make it fit, per actor that does not (empty when everything fits)
    zero_stage: Optional[int] = None  # the learners' ZeRO stage the plan is for
    problems: list[str] = dataclasses.field(default_factory=list)  # lengths that cannot work (always refusals)
    notes: list[str] = dataclasses.field(default_factory=list)  # what was not planned, and why

    @property
    def fits(self) -> bool:
        return not self.problems and all(a.fits for a in self.actors)

    def refusal(self) -> Optional[str]:
        """One line: the first actor (or length) that cannot fit, predicted vs available, and the knobs."""
        if self.problems:
            return self.problems[0]
        for actor, advice in zip([a for a in self.actors if not a.fits], self.advice):
            return (f"memory plan: {actor.role} needs {actor.predicted_gib:.1f} GiB but has {actor.available_gib:.1f} "
                    f"GiB ({actor.device}); {advice}")
        return None

    def to_json(self) -> dict:
        return {"fits": self.fits, "zero_stage": self.zero_stage, "actors": [a.row() for a in self.actors],
                "advice": self.problems + self.advice, "notes": self.notes}

    def table(self) -> str:
        lines = [f"{'actor':<18} {'count':>5} {'device':<6} {'predicted GiB':>13} {'available GiB':>13}  fits  parts"]
        for a in self.actors:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in a.parts.items() if v >= 0.005)
            lines.append(f"{a.role:<18} {a.count:>5} {a.device:<6} {a.predicted_gib:>13.2f} {a.available_gib:>13.2f}  "
                         f"{'yes' if a.fits else 'NO ':<4}  {parts}")
        return "\n".join(lines + [f"advice: {x}" for x in self.problems + self.advice] + [f"note: {x}" for x in self.notes])


# ----------------------------------------------------------------------------- the cluster


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


# ----------------------------------------------------------------------------- the model's shapes


@dataclasses.dataclass(frozen=True)
class ModelShape:
    path: str
    is_home: bool
    multimodal: bool
    params: int  # every parameter the learner holds (frozen copies included)
    trainable: int  # what the optimiser updates
    frozen_copies: int  # parameters of the frozen expert copies (e.g. think_ref)
    vision: int  # parameters of the vision tower
    view: int  # parameters of one expert view (what a rollout engine serves); the whole model when dense
    home_checkpoint: int  # parameters of the checkpoint on disk (no frozen copies)
    largest_layer: int  # parameters of the largest decoder layer, every expert: what ZeRO-3 gathers at once
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_dim: int  # key/value heads x head size
    context: int  # max_position_embeddings of the language model
    disk_bytes: int  # bytes per parameter on disk (the config's dtype)

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


def model_shape(model_dir: str | Path, trainable: Any = "all", frozen_copies: Sequence[str] = ()) -> ModelShape:
    """Exact parameter counts of the model in `model_dir` (its config.json alone) as a learner holds it.

    Counting builds the model on the meta device, which needs transformers' modelling code: importing it
    takes 3-7 s on the 2-core machine, more than the rest of a plan. The counts of a config.json (and trainable
    set) are therefore kept in the cache (~/.cache/home_rl/shapes) and read back by the next plan of it."""
    folder = Path(model_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json to plan from")
    key = hashlib.sha256(config_path.read_bytes() + json.dumps([str(trainable), list(frozen_copies)]).encode())
    cached = _cache_root() / "shapes" / f"{key.hexdigest()[:32]}.json"
    if cached.is_file():
        try:
            return ModelShape(**{**json.loads(cached.read_text()), "path": str(folder)})
        except (TypeError, ValueError):  # written by an earlier version of ModelShape: count again
            pass
    shape = _count(folder, trainable, frozen_copies)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(shape)))
        tmp.replace(cached)
    except OSError:  # a read-only cache only costs the next plan its time
        pass
    return shape


def _cache_root() -> Path:
    # home_rl.model.embedded.cache_dir, without importing the model package (transformers) for it
    return Path(os.environ.get("HOME_RL_CACHE", Path.home() / ".cache" / "home_rl"))


def _count(folder: Path, trainable: Any, frozen_copies: Sequence[str]) -> ModelShape:
    import torch
    import transformers

    from home_rl.learner.config import frozen_copy_map, trainable_patterns
    from home_rl.learner.optim import name_matches
    from home_rl.model import HomeModel, view_name
    from home_rl.model.home import HOME_KEY
    from home_rl.model.architectures import architecture_of, decoder_layers, model_class, read_config_json, text_config

    raw = read_config_json(folder)
    arch = architecture_of(raw, where=str(folder / "config.json"))
    is_home = HOME_KEY in raw
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        if is_home:
            home_config = getattr(config, HOME_KEY)
            delattr(config, HOME_KEY)
            model = HomeModel.from_config(config, home_config, dtype=torch.float32,
                                          copies=frozen_copy_map(frozen_copies))
            layers = decoder_layers(model.base, arch)
        else:
            if frozen_copies:
                raise ConfigError(f"learner.frozen_copies={list(frozen_copies)} needs a HOME model; {folder} is dense")
            model = model_class(arch)._from_config(config, dtype=torch.float32)
            layers = decoder_layers(model, arch)
    patterns = trainable_patterns(trainable)
    copies = tuple(f"*.experts.{name}.*" for name in frozen_copy_map(frozen_copies))
    counts = dict(params=0, trainable=0, frozen_copies=0, vision=0, view=0)
    for name, p in model.named_parameters():
        n = p.numel()
        counts["params"] += n
        in_copy = any(name_matches(name, c) for c in copies)
        counts["frozen_copies"] += n if in_copy else 0
        counts["trainable"] += n if any(name_matches(name, q) for q in patterns) and not in_copy else 0
        counts["vision"] += n if ".visual." in f".{name}" else 0
        counts["view"] += n if (not is_home or view_name(name, "think") is not None) else 0
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    text = text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or text_dtype(raw) or "float32")
    return ModelShape(path=str(folder), is_home=is_home, multimodal=arch.multimodal, largest_layer=largest,
                      home_checkpoint=counts["params"] - counts["frozen_copies"], hidden=text.hidden_size,
                      intermediate=text.intermediate_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
                      kv_dim=kv_heads * head_dim, context=int(getattr(text, "max_position_embeddings", 0) or 0),
                      disk_bytes=_dtype_bytes(dtype), **counts)


def text_dtype(raw: dict) -> Optional[str]:
    text = raw.get("text_config") or {}
    return text.get("torch_dtype") or text.get("dtype")


def _dtype_bytes(name: str) -> int:
    return 4 if "32" in str(name) else 2


def planned_model_dir(path: str, recipe: str) -> Path:
    """The folder whose config.json describes `model.path`: itself, or an embedded model's cached folder
    (the GRPO recipe trains its HOME cold start, SFT the dense model). Never builds or converts anything."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder
    from home_rl.model.embedded import EMBEDDED, cache_dir

    if path not in EMBEDDED:
        raise ConfigError(f"model.path={path}: no config.json there to plan from")
    folder = cache_dir() / "models" / (f"{path}-home" if recipe == "grpo_think" else path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path={path}: its cached model {folder} is not built yet; run the recipe once "
                          f"(it builds it) or give model.path=FOLDER")
    return folder


# ----------------------------------------------------------------------------- the run's shape


@dataclasses.dataclass
class Run:
    """What the plan needs from a recipe's config, whichever recipe it is."""
    learner: Any = None  # LearnerConfig, or None (no learners)
    rollout: Any = None  # RolloutConfig, or None (no rollout workers)
    reward_workers: int = 0
    router_trainer: bool = False  # the router stage / evaluation's actor holding the HOME checkpoint
    dtype: str = "bfloat16"  # model.dtype: the learners' training dtype
    prompt_tokens: int = 1024  # data.max_prompt_tokens
    response_tokens: int = 128  # the longest response a learner trains on
    exports_view: bool = False  # the driver exports the think view (GRPO)
    mode: str = "disaggregated"  # cluster.mode
    on_long_prompt: str = "error"


def run_of(cfg: Any, recipe: str) -> Run:
    """The Run of a recipe config: grpo_think (GRPOThinkConfig), sft (SFTConfig), router (the router stage and
    the evaluation: RouterStageConfig, EvaluateConfig)."""
    reward = getattr(cfg, "reward", None)
    cluster = getattr(cfg, "cluster", None)
    common = dict(dtype=cfg.model.dtype if hasattr(cfg, "model") else "bfloat16",
                  prompt_tokens=cfg.data.max_prompt_tokens, reward_workers=reward.num_workers if reward else 0,
                  mode=cluster.mode if cluster else "disaggregated")
    if recipe == "grpo_think":
        return Run(learner=cfg.learner, rollout=cfg.rollout, response_tokens=cfg.rollout.max_response_tokens,
                   exports_view=True, on_long_prompt=cfg.rollout.on_long_prompt, **common)
    if recipe == "sft":
        return Run(learner=cfg.learner, response_tokens=cfg.sft.max_response_tokens, **common)
    if recipe == "router":
        rollout = cfg.rollout if not getattr(cfg, "labels_path", "") else None
        return Run(rollout=rollout, router_trainer=True, response_tokens=cfg.rollout.max_response_tokens,
                   on_long_prompt=cfg.rollout.on_long_prompt, **common)
    raise ConfigError(f"unknown recipe {recipe!r} for the memory plan: grpo_think | sft | router")


# ----------------------------------------------------------------------------- predictions


def learner_parts(shape: ModelShape, learner: Any, stage: int, dtype_bytes: int, run: Run) -> dict[str, float]:
    """GiB per part of one learner's peak on its device (a GPU, or the host on CPU), and the host RAM of loading."""
    w = learner.num_learners
    b = dtype_bytes
    # AdamW's m + v (fp32), and an fp32 master copy of what trains: ZeRO's optimizers keep one whatever the dtype,
    # stage 0 only in 16-bit training (DeepSpeed's bf16 optimizer; fp32 runs torch's AdamW on the weights)
    optim_bytes = 12 if b < 4 or stage >= 1 else 8
    parts = {
        "weights": shape.params * b / (w if stage == 3 else 1),
        # ZeRO-3 also keeps the fp32 gradient partition its optimizer steps on
        "gradients": shape.trainable * (b + (4 if stage == 3 else 0)) / (w if stage >= 2 else 1),
        "optimizer": shape.trainable * optim_bytes / (w if stage >= 1 else 1),
        "gathered": min(shape.params, max(shape.largest_layer, MAX_LIVE_PARAMS)) * b if stage == 3 else 0.0,
        "buckets": (min(REDUCE_BUCKET_ELEMS, shape.trainable) * REDUCE_BUCKET_COPIES if stage >= 1
                    else min(ALLREDUCE_BUCKET_ELEMS, shape.trainable)) * b
                   + (min(PREFETCH_BUCKET_ELEMS, shape.params) * b if stage == 3 else 0),
    }
    rows, length, kept = micro_batch_shape(learner, run)
    tokens = rows * length
    per_layer = ACT_HIDDEN_ELEMS * shape.hidden + ACT_MLP_ELEMS * shape.intermediate + 2 * shape.kv_dim
    if learner.gradient_checkpointing:
        parts["activations"] = tokens * (shape.layers * CKPT_HIDDEN_ELEMS * shape.hidden + per_layer) * b
    else:
        parts["activations"] = tokens * shape.layers * per_layer * b
    # logits [rows, kept, vocab]: the LM head's output in the training dtype, then fp32 copies (home_rl/learner/losses.py)
    parts["logits"] = rows * kept * shape.vocab * (4 * LOGIT_COPIES + (b if b < 4 else 0))
    if getattr(learner, "shared_prefix", False) and run.rollout is not None and run.rollout.n > 1:
        # Shared rows hold fewer tokens than separate ones (the prompt once), so the parts above bound them;
        # what they add is the 4D attention mask [rows, 1, T, T], boolean, and sdpa's copy in the training dtype.
        # (Rows of one sequence, as in SFT, run the plain causal pass: no mask.)
        shared_rows, shared_length = shared_row_shape(learner, run)
        parts["attention_mask"] = shared_rows * shared_length ** 2 * (1 + b)
    # loading (home_rl/learner/model_io.py): under ZeRO-3 a rank holds its partition and one layer at a time,
    # stages 0-2 the whole model once
    load = (shape.params / w + shape.largest_layer) * b if stage == 3 else shape.params * b
    return {k: v / GIB for k, v in parts.items()} | {"loading": load / GIB}


def micro_batch_shape(learner: Any, run: Run) -> tuple[int, int, int]:
    """(rows, tokens per row, kept logit positions per row) of the largest micro-batch a learner runs.

    Every sequence as long as the config allows (data.max_prompt_tokens + the response limit); with a token
    budget (learner.max_tokens_per_micro_batch) as many such rows as the budget holds, at least one."""
    length = run.prompt_tokens + run.response_tokens
    if run.rollout is not None:
        length = min(length, run.rollout.max_model_len)
    budget = int(getattr(learner, "max_tokens_per_micro_batch", 0) or 0)
    rows = max(1, budget // length) if budget > 0 else learner.micro_batch_size
    return rows, length, min(run.response_tokens, length)


def shared_row_shape(learner: Any, run: Run) -> tuple[int, int]:
    """(rows, tokens per row) of the largest shared-prefix micro-batch: rows of one prompt and as many of its
    rollout.n responses as a micro-batch (or the token budget) holds."""
    prompt = run.prompt_tokens
    n = run.rollout.n if run.rollout is not None else 1
    budget = int(getattr(learner, "max_tokens_per_micro_batch", 0) or 0)
    if budget > 0:
        per_row = max(1, min(n, (budget - prompt) // max(run.response_tokens, 1)))
        length = prompt + per_row * run.response_tokens
        return max(1, budget // length), length
    per_row = max(1, min(n, learner.micro_batch_size))
    return max(1, learner.micro_batch_size // per_row), prompt + per_row * run.response_tokens


def rollout_parts(shape: ModelShape, rollout: Any, on_gpu: bool, gpu_gib: float, bf16: bool = True) -> dict[str, float]:
    # a CPU without bfloat16 runs a bfloat16 engine in float32 (home_rl/rollout/worker.py)
    b = 4 if rollout.dtype == "float32" or (rollout.dtype == "bfloat16" and not bf16 and not on_gpu) else 2
    tp = max(1, rollout.tensor_parallel_size)
    parts = {"weights": shape.view * b / tp / GIB}
    if on_gpu:  # vLLM takes its share of the GPU whole: weights, activations, and the rest as KV cache
        budget = rollout.gpu_memory_utilization * gpu_gib
        if rollout.kv_cache_gib > 0:
            budget = min(budget, parts["weights"] + VLLM_GPU_ACTIVATIONS_GIB + rollout.kv_cache_gib)
        parts["kv_cache"] = max(budget - parts["weights"] - VLLM_GPU_ACTIVATIONS_GIB, 0.0)
        parts["activations"] = VLLM_GPU_ACTIVATIONS_GIB
    else:
        parts["kv_cache"] = rollout.kv_cache_gib or 4.0  # vLLM CPU's own default (VLLM_CPU_KVCACHE_SPACE) when 0
    if shape.multimodal:  # the encoder cache (image embeddings waiting for the decoder) and one image's encoding
        cached = max(rollout.limit_images_per_prompt * IMAGE_TOKENS, ENCODER_CACHE_TOKENS) * shape.hidden * b
        encoding = IMAGE_TOKENS * 4 * 4 * shape.hidden * b  # 4 patches per merged token, ~4 hidden-sized transients
        parts["vision_buffers"] = (cached + encoding) / GIB
    return parts


def kv_bytes_per_token(shape: ModelShape, rollout: Any) -> float:
    """KV-cache bytes of one token on one engine: keys and values of every layer, split over tensor parallel."""
    b = 4 if rollout.dtype == "float32" else 2
    return shape.layers * 2 * shape.kv_dim * b / max(1, rollout.tensor_parallel_size)


def plan(shape: ModelShape, run: Run, cluster: Cluster, zero_stage: Optional[int] = None) -> MemoryPlan:
    """Every actor's predicted peak against what it gets on `cluster`, for one ZeRO stage (None: the config's)."""
    actors: list[ActorPlan] = []
    advice: list[str] = []  # one per actor that does not fit, in order
    notes: list[str] = []
    problems = length_problems(shape, run)
    gpus = cluster.gpus
    gpu_size = max((n.gpu_gib for n in cluster.nodes), default=0.0)
    gpu_gib, host0 = gpu_size * USABLE, cluster.nodes[0].host_gib * USABLE  # what an actor may plan on
    host_of: list[float] = [0.0] * len(cluster.nodes)  # host RAM per node, as placed
    gpu_left = [n.gpus for n in cluster.nodes]

    def place(gpu_count: int, host_gib: float, count: int) -> None:
        for _ in range(count):  # first fit by GPUs (learners PACK, rollout workers SPREAD over what is left)
            i = next((k for k, left in enumerate(gpu_left) if left >= gpu_count), 0)
            gpu_left[i] -= gpu_count
            host_of[i] += host_gib

    learner = run.learner
    stage = None
    colocated = run.mode == "colocated" and learner is not None and run.rollout is not None
    learner_state = 0.0  # what a learner keeps on its GPU while a colocated engine generates beside it
    if learner is not None:
        stage = zero_stage if zero_stage is not None else (3 if learner.zero_stage == "auto" else int(learner.zero_stage))
        on_gpu = learner.gpus_per_learner(gpus) > 0
        b = 4 if run.dtype == "float32" or (run.dtype == "bfloat16" and not cluster.bf16 and not on_gpu) else 2
        parts = learner_parts(shape, learner, stage, b, run)
        loading = parts.pop("loading")
        train = sum(parts.values())
        if on_gpu and gpus < learner.num_learners * learner.gpus_per_learner(gpus):
            # GPUs the cluster lacks: the resource check (job_placement) names them, by their keys
            notes.append(f"learners: not planned, {cluster.source} lacks their GPUs (the resource check says which)")
        elif on_gpu and gpu_size <= 0:
            notes.append("learners: not planned on their GPUs, whose memory is unknown (recipes/plan.py --gpu-gib)")
            place(1, LEARNER_BASELINE_GIB + loading, learner.num_learners)
        elif on_gpu:
            predicted = train + GPU_CONTEXT_GIB
            host = LEARNER_BASELINE_GIB + loading
            # colocated, the engine beside it sleeps during the update but keeps its CUDA context
            available = gpu_gib - (GPU_CONTEXT_GIB if colocated else 0.0)
            learner_state = parts["weights"] + parts["gradients"] + parts["optimizer"] + GPU_CONTEXT_GIB
            actors.append(ActorPlan("learner", learner.num_learners, "cuda", predicted, available,
                                    {**parts, "cuda_context": GPU_CONTEXT_GIB}))
            place(1, host, learner.num_learners)
        else:  # on a CPU the host holds it all: loading comes first, training after (the peak is the larger)
            predicted = LEARNER_BASELINE_GIB + max(loading, train)
            host = predicted
            actors.append(ActorPlan("learner", learner.num_learners, "cpu", predicted, host0,
                                    {**parts, "baseline": LEARNER_BASELINE_GIB, "loading": loading}))
            place(0, host, learner.num_learners)
        if actors and actors[-1].role == "learner" and not actors[-1].fits:
            advice.append(learner_advice(learner, stage, on_gpu, parts))

    rollout = run.rollout
    if rollout is not None:
        on_gpu = rollout.resources.gpus > 0  # rollout workers take GPUs only when asked (rollout.resources.gpus)
        parts = rollout_parts(shape, rollout, on_gpu, gpu_size, cluster.bf16)
        if on_gpu and gpus < rollout.num_workers * rollout.resources.gpus:
            notes.append(f"rollout: not planned, {cluster.source} lacks its GPUs (the resource check says which)")
        elif on_gpu and gpu_size <= 0:
            notes.append("rollout: not planned on its GPUs, whose memory is unknown (recipes/plan.py --gpu-gib)")
            place(int(rollout.resources.gpus), ROLLOUT_BASELINE_GIB + parts["weights"], rollout.num_workers)
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
                actors.append(ActorPlan("rollout", rollout.num_workers, "cuda", need, budget,
                                        {**parts, "kv_cache": one_sequence}))
                advice.append(f"rollout: the weights, activations and one rollout.max_model_len={rollout.max_model_len} "
                              f"sequence need {need:.1f} GiB of its gpu_memory_utilization share ({budget:.1f} GiB): "
                              f"raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size, or lower "
                              f"rollout.max_model_len")
            else:
                available = gpu_size - learner_state if colocated else gpu_size
                actors.append(ActorPlan("rollout", rollout.num_workers, "cuda", budget + GPU_CONTEXT_GIB, available,
                                        {**parts, "cuda_context": GPU_CONTEXT_GIB}))
                if not actors[-1].fits:
                    advice.append("lower rollout.gpu_memory_utilization" + (" (colocated, its learner's weights and "
                                  "optimizer state stay on the GPU)" if colocated else ""))
            place(0 if colocated else int(rollout.resources.gpus), host, rollout.num_workers)
        else:
            predicted = ROLLOUT_BASELINE_GIB + sum(parts.values())
            actors.append(ActorPlan("rollout", rollout.num_workers, "cpu", predicted, host0,
                                    {**parts, "baseline": ROLLOUT_BASELINE_GIB}))
            place(0, predicted, rollout.num_workers)
            if not actors[-1].fits:
                advice.append("lower rollout.kv_cache_gib or rollout.num_workers")

    if run.router_trainer:  # HomeModel.from_pretrained in the checkpoint's dtype, read a tensor at a time
        weights = shape.home_checkpoint * shape.disk_bytes / GIB
        predicted = LEARNER_BASELINE_GIB + weights
        actors.append(ActorPlan("router trainer", 1, "cpu", predicted, host0,
                                {"weights": weights, "loading": weights, "baseline": LEARNER_BASELINE_GIB}))
        place(0, predicted, 1)
        if not actors[-1].fits:
            advice.append("the router trainer holds the whole HOME checkpoint: give it a node with more RAM")
    if run.reward_workers:
        actors.append(ActorPlan("reward", run.reward_workers, "cpu", REWARD_WORKER_GIB, host0,
                                {"baseline": REWARD_WORKER_GIB}))
        place(0, REWARD_WORKER_GIB, run.reward_workers)
    driver = {"baseline": DRIVER_BASELINE_GIB}
    if run.exports_view:  # export_think_view: HomeModel.from_pretrained in the checkpoint's dtype, streamed
        driver["view_export"] = shape.home_checkpoint * shape.disk_bytes / GIB
    host_of[0] += sum(driver.values())
    actors.append(ActorPlan("driver", 1, "cpu", sum(driver.values()), host0, driver))
    if not actors[-1].fits:
        advice.append("the driver exports the think view from the whole HOME checkpoint: run it on a node "
                      "with more RAM")
    for i, (node, used) in enumerate(zip(cluster.nodes, host_of)):
        actors.append(ActorPlan(f"host node {i}", 1, "host", used, node.host_gib * USABLE, {"placed": used}))
        if used > node.host_gib * USABLE:
            advice.append(host_advice(run, stage))
    return MemoryPlan(actors, advice, zero_stage=stage, problems=problems, notes=notes)


def length_problems(shape: ModelShape, run: Run) -> list[str]:
    """Lengths that cannot work against the model's context: refused before any actor starts."""
    out = []
    rollout = run.rollout
    if rollout is not None and shape.context and rollout.max_model_len > shape.context:
        out.append(f"rollout.max_model_len={rollout.max_model_len} is above the model's context of {shape.context} "
                   f"tokens (max_position_embeddings in {shape.path}/config.json): lower rollout.max_model_len")
    if rollout is not None and run.on_long_prompt == "error" and \
            run.prompt_tokens + rollout.max_response_tokens > rollout.max_model_len:
        out.append(f"data.max_prompt_tokens={run.prompt_tokens} + rollout.max_response_tokens="
                   f"{rollout.max_response_tokens} = {run.prompt_tokens + rollout.max_response_tokens} is above "
                   f"rollout.max_model_len={rollout.max_model_len}: a long prompt would stop the run midway; lower "
                   f"data.max_prompt_tokens, raise rollout.max_model_len, or set rollout.on_long_prompt=truncate|skip")
    if rollout is None and run.learner is not None and shape.context and \
            run.prompt_tokens + run.response_tokens > shape.context:
        out.append(f"data.max_prompt_tokens={run.prompt_tokens} + {run.response_tokens} response tokens is above "
                   f"the model's context of {shape.context} tokens (max_position_embeddings in {shape.path}/config.json)")
    return out


def learner_advice(learner: Any, stage: int, on_gpu: bool, parts: dict[str, float]) -> str:
    """The knobs that shrink a learner's largest parts, biggest first."""
    knobs = []
    mask = parts.get("attention_mask", 0.0)
    if mask > 0.1 * sum(parts.values()):  # long shared rows: their mask grows with the square of the row
        knobs.append("set learner.shared_prefix=false")
    by_token = parts["activations"] + parts["logits"] + mask
    state = parts["weights"] + parts["gradients"] + parts["optimizer"]
    budget = int(getattr(learner, "max_tokens_per_micro_batch", 0) or 0)
    if budget:
        micro = f"lower learner.max_tokens_per_micro_batch (now {budget})"
    elif hasattr(learner, "max_tokens_per_micro_batch"):
        micro = f"lower learner.micro_batch_size (now {learner.micro_batch_size}) or set learner.max_tokens_per_micro_batch"
    else:
        micro = f"lower learner.micro_batch_size (now {learner.micro_batch_size})"
    if by_token >= state:
        knobs.append(micro)
        if not learner.gradient_checkpointing:
            knobs.append("set learner.gradient_checkpointing=true")
    if stage < 3:
        knobs.append("raise learner.zero_stage (or auto)")
    knobs.append(f"raise learner.num_learners (now {learner.num_learners})")
    if by_token < state:
        knobs.append(micro)
    return "fix: " + ", or ".join(knobs)


def host_advice(run: Run, stage: Optional[int]) -> str:
    knobs = []
    if run.learner is not None and stage is not None and stage < 3:
        knobs.append("learner.zero_stage=3 (each learner then loads its partition only)")
    if run.rollout is not None:
        knobs.append("lower rollout.kv_cache_gib or rollout.num_workers")
    if run.learner is not None:
        knobs.append("lower learner.micro_batch_size or learner.num_learners")
    return "host RAM: " + ", or ".join(knobs) + ", or add nodes"


# ----------------------------------------------------------------------------- entry points


def plan_for_config(cfg: Any, recipe: str = "grpo_think", cluster: Optional[Cluster] = None,
                    model_dir: Optional[str | Path] = None) -> MemoryPlan:
    """The plan of a loaded recipe config on `cluster` (None: where the recipe would run). With
    learner.zero_stage=auto, the plan of the stage choose_zero_stage picks."""
    run = run_of(cfg, recipe)
    folder = Path(model_dir) if model_dir is not None else planned_model_dir(_model_path(cfg), recipe)
    learner = run.learner
    shape = model_shape(folder, learner.trainable if learner is not None else "all",
                        list(learner.frozen_copies) if learner is not None else ())
    cluster = cluster or current_cluster()
    if learner is not None and learner.zero_stage == "auto":
        return plan(shape, run, cluster, choose_zero_stage(shape, run, cluster))
    return plan(shape, run, cluster)


def choose_zero_stage(shape: ModelShape, run: Run, cluster: Cluster) -> int:
    """The lowest ZeRO stage whose plan fits (less partitioning: less communication), 3 where none does, or where
    the learners could not be planned (GPUs of unknown memory)."""
    for stage in ZERO_STAGES:
        result = plan(shape, run, cluster, stage)
        if not any(a.role == "learner" for a in result.actors):
            return 3
        if result.fits:
            return stage
    return 3


def _model_path(cfg: Any) -> str:
    if hasattr(cfg, "model"):
        return cfg.model.path
    return cfg.checkpoint  # the router stage and the evaluation name their HOME checkpoint


def check_memory(cfg: Any, recipe: str, model_dir: str | Path, cluster: Optional[Cluster] = None) -> MemoryPlan:
    """The start-up check of every recipe: raise ConfigError (exit 2) with one line when something cannot fit;
    with learner.zero_stage=auto, set the stage the plan chose (so config.yaml records it) and say it."""
    learner = getattr(cfg, "learner", None)
    result = plan_for_config(cfg, recipe, cluster, model_dir)
    if learner is not None and learner.zero_stage == "auto":
        learner.zero_stage = result.zero_stage
        learner_fits = all(a.fits for a in result.actors if a.role == "learner")
        fits = "the lowest stage that fits" if learner_fits else "none fits: the most partitioned"
        log.info("memory: learner.zero_stage=auto chose ZeRO stage %d (%.1f GiB per learner, %s)",
                 result.zero_stage, _learner_gib(result), fits)
    enabled = getattr(getattr(cfg, "cluster", None), "check_memory", True)
    refusal = result.refusal()
    if refusal is not None and (enabled or result.problems):
        raise ConfigError(refusal + ("" if result.problems else " (cluster.check_memory=false skips this check)"))
    return result


def _learner_gib(result: MemoryPlan) -> float:
    return next((a.predicted_gib for a in result.actors if a.role == "learner"), 0.0)
