"""Config sections of the router stage (recipes/train_router.py) and the hybrid evaluation (recipes/evaluate.py)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, List

from data_pipelines import DataConfig
from home_rl.context_length import fit_rollout_lengths
from home_rl.errors import ConfigError
from home_rl.memory_plan.run import Run
from home_rl.experts import EXPERTS, FAST
from home_rl.resources import Resources, resources_field
from home_rl.router.operating_point import parse_budget
from home_rl.rollout.config import RolloutConfig
from reward import RewardConfig

DEFAULT_CHECKPOINT = "outputs/grpo_think/final"  # what recipes/grpo_think.py writes with its defaults
DEFAULT_ROUTER_OUTPUT = "outputs/router"


def _rollout_defaults() -> RolloutConfig:
    # Greedy decoding, one sample per expert: the router picks who answers at deployment, where answers
    # are decoded greedily (verl validates the same way), and one greedy sample per expert costs a
    # quarter of four sampled ones, so the same time labels four times the prompts.
    # Sampled labels (n=4, temperature 1.0) were tried and were worse: sampled, fast solved 65% of
    # one-step sums against think's 81%, so 47% of them were labelled think; and long problems were
    # not labelled think more often (38-57% at 3-6 steps), as sampled think solves fewer of them too.
    # 160 tokens: the worked trace of a six-step problem is about 120.
    return RolloutConfig(n=1, temperature=0.0, max_response_tokens=160)


def _reward_defaults() -> RewardConfig:
    return RewardConfig(num_workers=1)


@dataclasses.dataclass
class LabelConfig:
    margin: float = 0.1  # think must beat fast in accuracy by more than this (10 points: not for the 2-3 it adds on one-step sums) ...
    length_cost: float = 0.1  # ... plus this times its extra mean length as a fraction of rollout.max_response_tokens

    def __post_init__(self):
        if self.length_cost < 0:
            raise ConfigError(f"labels.length_cost must be >= 0, got {self.length_cost}")


@dataclasses.dataclass
class SyntheticMixConfig:
    rows: int = 512  # rows made when data.path is empty
    ratio: str = "math=0.5,arith=0.25,extract=0.25"  # families and weights of the mix (math: 1-6 step word problems; arith: one-step sums; extract: copy from the prompt)
    image_fraction: float = 0.0  # share of math rows rendered into an image
    seed: int = 0  # seed of the synthetic rows

    def parsed_ratio(self) -> dict[str, float]:
        from data_pipelines.synthetic import parse_ratio

        return parse_ratio(self.ratio, "synthetic.ratio")


@dataclasses.dataclass
class RouterTrainConfig:
    init: str = "fresh"  # fresh (new weights from seed) | checkpoint (continue from the checkpoint's router)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1.0  # AdamW weight decay (strong: one greedy sample per expert gives noisy targets)
    batch_size: int = 64  # labelled prompts per optimizer step
    max_epochs: int = 200  # passes over the training split at most
    patience: int = 20  # stop after this many epochs without a better validation loss (the best epoch's weights are kept)
    min_delta: float = 1e-4  # a validation loss counts as better when it drops by more than this
    val_fraction: float = 0.2  # share of each class (and, in the router stage, of each data_source and step count) held out for validation and early stopping
    target: str = "expected_gain"  # expected_gain (soft P(think) = 0.5 + net gain / 2: think where similar prompts gain on average) | label (the 0/1 labels)
    class_weights: str = "auto"  # balanced (weight of a class = prompts / (classes * its prompts)) | none | auto (balanced for target=label, none for expected_gain)
    seed: int = 0  # seeds the split, the initial weights and the batch order
    budget: str = "accuracy=1"  # the operating point, calibrated on the validation split: tokens=F (most accurate at <= F x always-think's tokens) | accuracy=D (fewest tokens within D points of always-think) | "" (argmax)

    CHOICES: ClassVar[dict] = {"init": ("fresh", "checkpoint"), "target": ("expected_gain", "label"),
                               "class_weights": ("auto", "balanced", "none")}

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"router.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ConfigError("router.batch_size, router.max_epochs and router.patience must be at least 1")
        parse_budget(self.budget)


@dataclasses.dataclass
class RouterActorConfig:
    resources: Resources = resources_field()  # what the HomeModelActor (it holds the HOME model) asks Ray for; gpus 1 on GPU clusters: the features run on it
    feature_batch_size: int = 8  # prompts per no-grad forward pass when computing router features
    template: str = FAST  # which expert's rendering of a prompt the router reads (Stage-SFT's sft.router_template)

    CHOICES: ClassVar[dict] = {"template": EXPERTS}


@dataclasses.dataclass
class RouterStageConfig:
    checkpoint: str = DEFAULT_CHECKPOINT  # HOME checkpoint whose router is trained (default: the GRPO run's final)
    output_dir: str = DEFAULT_ROUTER_OUTPUT  # labels.jsonl, metrics.jsonl, router_metrics.json, final/ (the HOME checkpoint with the trained router)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # prompts to label (data.path empty: the synthetic mix below)
    synthetic: SyntheticMixConfig = dataclasses.field(default_factory=SyntheticMixConfig)  # the default data: a mix of multi-step math, single-step arithmetic and extract rows
    rollout: RolloutConfig = dataclasses.field(default_factory=_rollout_defaults)  # vLLM workers serving each view in turn (rollout.n samples per prompt and expert)
    reward: RewardConfig = dataclasses.field(default_factory=_reward_defaults)  # verifiers per data_source
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)  # when think wins: accuracy gain against extra length
    router: RouterTrainConfig = dataclasses.field(default_factory=RouterTrainConfig)  # how the router is fitted
    actor: RouterActorConfig = dataclasses.field(default_factory=RouterActorConfig)  # the HomeModelActor: holds the HOME model, computes router features, fits the router
    labels_path: str = ""  # reuse an existing labels.jsonl (no rollouts); its ids must be rows of the data
    think_sources: List[str] = dataclasses.field(default_factory=lambda: ["math"])  # data types labelled think by the paper's type labels (recorded beside each label)
    select_layers: List[int] = dataclasses.field(default_factory=list)  # decoder layers the router's input may be read after, chosen by validation loss ([]: a quarter, half and three quarters of the depth, and the checkpoint's own)
    select_poolings: List[str] = dataclasses.field(default_factory=lambda: ["mean", "last"])  # poolings it may use, chosen with the layer
    seed: int = 0  # seeds sampling (the fit has its own router.seed)
    tensorboard: bool = False  # also write the fit's curves as TensorBoard events

    def __post_init__(self):
        bad = [p for p in self.select_poolings if p not in ("mean", "last")]
        if bad or not self.select_poolings:
            raise ConfigError(f"select_poolings={self.select_poolings}: each must be mean or last (at least one)")
        if any(layer < 0 for layer in self.select_layers):
            raise ConfigError(f"select_layers={self.select_layers}: decoder layers count from 0")

    def candidates(self, num_layers: int, own: tuple[int, str]) -> list[tuple[int, str]]:
        """The (layer, pooling) pairs the router's input is chosen from, the checkpoint's own first."""
        layers = self.select_layers or sorted({num_layers // 4, num_layers // 2, 3 * num_layers // 4, own[0]})
        if bad := [layer for layer in layers if layer >= num_layers]:
            raise ConfigError(f"select_layers: {bad} outside the model's {num_layers} decoder layers")
        pairs = [(layer, how) for layer in layers for how in self.select_poolings]
        return [own] + [p for p in pairs if p != own] if own in pairs else pairs

    def memory_run(self) -> Run:
        """What this stage runs, for the memory plan: rollout workers serving each view in turn (none when
        labels_path gives the labels), the actor holding the HOME checkpoint, and reward workers."""
        return Run(model_path=self.checkpoint, rollout=None if self.labels_path else self.rollout, router_trainer=True,
                   reward_workers=self.reward.num_workers, prompt_tokens=self.data.max_prompt_tokens,
                   response_tokens=self.rollout.max_response_tokens, on_long_prompt=self.rollout.on_long_prompt)

    def resolve(self, given: frozenset[str] = frozenset()) -> "RouterStageConfig":
        """The lengths the user did not set, fitted to the checkpoint's context (home_rl/context_length.py)."""
        fit_rollout_lengths(self, self.checkpoint, given)
        return self


@dataclasses.dataclass
class TypeRouterConfig:
    enabled: bool = True  # also score a router trained on data-type labels (the paper's Stage-SFT labels)
    data_path: str = ""  # prompts it is trained on (empty: synthetic_rows rows of the evaluation mix's families with seed synthetic_seed: by default the rows the default router stage labels)
    synthetic_rows: int = 512  # rows of that default mix
    synthetic_seed: int = 0  # its seed (0: the same rows the default router stage labels)
    think_sources: List[str] = dataclasses.field(default_factory=lambda: ["math"])  # data_source values whose type is think


def _eval_synthetic() -> SyntheticMixConfig:
    return SyntheticMixConfig(rows=320, seed=1)  # seed 1: other rows than the router was trained on (seed 0)


@dataclasses.dataclass
class EvaluateConfig:
    checkpoint: str = DEFAULT_ROUTER_OUTPUT + "/final"  # HOME checkpoint with a trained router (default: the router stage's final)
    output_dir: str = "outputs/evaluate"  # report.json, report.md, report.png, samples.jsonl
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # evaluation prompts (data.path empty: the synthetic mix below)
    synthetic: SyntheticMixConfig = dataclasses.field(default_factory=_eval_synthetic)  # the default evaluation data
    rollout: RolloutConfig = dataclasses.field(default_factory=_rollout_defaults)  # vLLM workers serving each view in turn
    reward: RewardConfig = dataclasses.field(default_factory=_reward_defaults)  # verifiers per data_source
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)  # the oracle's label rule (as in the router stage)
    type_router: TypeRouterConfig = dataclasses.field(default_factory=TypeRouterConfig)  # the paper's data-type labels, side by side
    router: RouterTrainConfig = dataclasses.field(default_factory=lambda: RouterTrainConfig(target="label"))  # how the type-label router is fitted (type labels carry no gains: target=label)
    actor: RouterActorConfig = dataclasses.field(default_factory=RouterActorConfig)  # the actor that holds the HOME model
    steps_at_least: int = 3  # also report "<source>@steps>=N" for sources whose rows have several step counts (0: off)
    samples: int = 4  # answers per prompt and expert sampled besides rollout's greedy ones, for report.json's `sampled` and the cross-fitted oracle (0: none; else at least 2)
    sample_temperature: float = 1.0  # their sampling temperature
    seed: int = 0  # seeds sampling

    def memory_run(self) -> Run:
        """What the evaluation runs, for the memory plan: rollout workers serving each view in turn, the actor
        holding the HOME checkpoint, and reward workers."""
        return Run(model_path=self.checkpoint, rollout=self.rollout, router_trainer=True,
                   reward_workers=self.reward.num_workers, prompt_tokens=self.data.max_prompt_tokens,
                   response_tokens=self.rollout.max_response_tokens, on_long_prompt=self.rollout.on_long_prompt)

    def __post_init__(self):
        if self.samples == 1 or self.samples < 0:
            raise ConfigError(f"samples={self.samples}: the cross-fitted oracle splits a prompt's samples in two "
                              "halves: give 0 (none) or at least 2")
        if self.samples and self.sample_temperature <= 0:
            raise ConfigError(f"sample_temperature={self.sample_temperature}: sampled answers need a temperature above 0")
        if self.router.target != "label":
            raise ConfigError(f"router.target={self.router.target}: the type-label router is fitted on data types, "
                              "which carry no accuracy gain to expect: router.target must be label here")

    def resolve(self, given: frozenset[str] = frozenset()) -> "EvaluateConfig":
        """The lengths the user did not set, fitted to the checkpoint's context (home_rl/context_length.py)."""
        fit_rollout_lengths(self, self.checkpoint, given)
        return self
