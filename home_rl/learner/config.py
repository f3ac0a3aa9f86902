"""The `learner` section of a recipe's config: the DeepSpeed learner group and its optimiser.

The learner trains in the model's own dtype (`model.dtype`): bfloat16 runs DeepSpeed's bf16 mode
(bf16 weights and activations, fp32 master copies in the optimiser), float32 runs plain fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, List

from home_rl.errors import ConfigError
from home_rl.resources import Resources, resources_field


@dataclasses.dataclass
class LearnerConfig:
    num_learners: int = 1  # learner actors: the data-parallel ranks of one DeepSpeed group
    zero_stage: Any = "auto"  # DeepSpeed ZeRO stage: auto (the lowest the memory plan says fits, 3 where none does) | 0 | 1 | 2 | 3 (parameters, gradients and optimiser state partitioned)
    trainable: Any = "all"  # what trains: all | think | fast | router | shared (all but experts and router), or glob patterns over parameter names ("glob -excluded_glob ...")
    lr: float = 1e-5  # peak learning rate (reached at the end of warm-up)
    lr_schedule: str = "constant"  # after warm-up: constant | cosine | linear (decay to min_lr_ratio * lr at the last step)
    warmup_steps: int = 0  # optimizer steps of linear warm-up from lr / (warmup_steps + 1)
    min_lr_ratio: float = 0.0  # end of the cosine / linear decay, as a fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay (not applied to biases and norm weights)
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    micro_batch_size: int = 16  # sequences per forward/backward pass on one learner (16 measured fastest per token on CPU)
    max_tokens_per_micro_batch: int = 0  # >0: pack micro-batches by tokens instead (rows x longest row at most this; a longer sequence runs alone), replacing micro_batch_size
    shared_prefix: bool = True  # the samples of a prompt share one row: the prompt (and its images) computed once, not n times (false: a row per sequence)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 30% more compute
    frozen_copies: List[str] = dataclasses.field(default_factory=list)  # frozen expert copies added before training, as NAME=EXPERT (e.g. ref=think for a KL reference); left out of saved checkpoints
    device: str = "auto"  # auto (GPUs when the Ray cluster has one per learner, else CPU) | cpu | cuda
    backend: str = "auto"  # torch.distributed backend: auto (nccl on GPU, gloo on CPU) | gloo | nccl
    resources: Resources = resources_field()  # what each learner actor asks Ray for: cpus, gpus, threads, node_resource

    CHOICES: ClassVar[dict] = {"zero_stage": ("auto", 0, 1, 2, 3), "lr_schedule": ("constant", "cosine", "linear"),
                               "device": ("auto", "cpu", "cuda"), "backend": ("auto", "gloo", "nccl")}

    def __post_init__(self):
        if isinstance(self.resources, dict):  # LearnerConfig(**to_dict(cfg)) in the learner actors
            self.resources = Resources(**self.resources)
        if self.num_learners < 1:
            raise ConfigError(f"learner.num_learners must be at least 1, got {self.num_learners}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"learner.micro_batch_size must be at least 1, got {self.micro_batch_size}")
        if self.max_tokens_per_micro_batch < 0:
            raise ConfigError(f"learner.max_tokens_per_micro_batch must be 0 (off) or a token count, "
                              f"got {self.max_tokens_per_micro_batch}")
        if len(self.betas) != 2:
            raise ConfigError(f"learner.betas needs two numbers, got {list(self.betas)}")
        trainable_patterns(self.trainable)  # raises on a bad value
        frozen_copy_map(self.frozen_copies)  # raises on a bad entry


    def gpus_per_learner(self, cluster_gpus: float) -> float:
        """GPUs each learner asks for: resources.gpus when set, else learner.device decides (auto: one each
        when the cluster has one per learner; a cuda shortage is reported by the resource check)."""
        if self.resources.gpus or self.device == "cpu":
            return self.resources.gpus
        return 1.0 if self.device == "cuda" or cluster_gpus >= self.num_learners else 0.0


def frozen_copy_map(frozen_copies: Any) -> dict[str, str]:
    """`learner.frozen_copies` (NAME=EXPERT entries) as {name: the expert it copies}."""
    copies = {}
    for item in frozen_copies:
        name, _, expert = str(item).partition("=")
        if not name or not expert:
            raise ConfigError(f"learner.frozen_copies entries are NAME=EXPERT (e.g. ref=think), got {item!r}")
        copies[name] = expert
    return copies


PRESETS = {
    "all": ("*",),
    "think": ("*.experts.think.*",),
    "fast": ("*.experts.fast.*",),
    "router": ("router.*",),
    "shared": ("* -*.experts.* -router.*",),  # attention, embeddings, norms, vision tower: what both views share
}


def trainable_patterns(trainable: Any) -> list[str]:
    """Glob patterns over parameter names for a `learner.trainable` value (a preset, a list, or 'a,b')."""
    if isinstance(trainable, str):
        items = [s.strip() for s in trainable.split(",") if s.strip()]
    elif isinstance(trainable, (list, tuple)) or type(trainable).__name__ == "ListConfig":
        items = [str(s).strip() for s in trainable]
    else:
        raise ConfigError(f"learner.trainable must be a preset ({', '.join(PRESETS)}) or a list of parameter-name "
                          f"patterns, got {trainable!r}")
    if not items:
        raise ConfigError(f"learner.trainable is empty: name a preset ({' | '.join(PRESETS)}) or patterns")
    patterns = []
    for item in items:
        patterns.extend(PRESETS.get(item, (item,)))
    return patterns
