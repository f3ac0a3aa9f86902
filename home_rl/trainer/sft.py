"""Supervised fine-tuning on rows with reference solutions: the dense cold start and HOME Stage-SFT.

Each row becomes one sequence per expert it trains: the prompt rendered with that expert's
template, and the reference response in that expert's format (`<think>trace</think><answer>…`
or `<think></think><answer>…`); the loss is on response tokens only.

- Dense model: the cold start. `sft.route=both` teaches both output templates on every row;
  `row` renders each row with its own type's template.
- HOME model: the paper's Stage-SFT. Each row runs on the expert of its type (reasoning data:
  think, perception / direct data: fast), and with `sft.router_loss_weight` > 0 the router
  learns the type labels by cross-entropy beside the token loss (1:1 in the paper).

A row's type: `extra_info.expert` when the row names one, else think for rows whose data_source
is in `sft.think_sources`, else fast.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, List, Optional

from data_pipelines import DataConfig, PromptLoader, load_dataset, render_prompt, response_token_ids
from data_pipelines.schema import BadRowError
from data_pipelines.templates import solution_of, target_response
from home_rl.cluster import ClusterConfig
from home_rl.config import ModelConfig
from home_rl.context_length import fit_lengths, model_context
from home_rl.errors import ConfigError, HomeRLError
from home_rl.experts import EXPERT_INDEX, EXPERTS, FAST, THINK, row_type
from home_rl.learner.batch import Sequence
from home_rl.learner.config import LearnerConfig
from home_rl.trainer.config import TrainerConfig
from home_rl.trainer.job import TrainingJob
from home_rl.trainer.startup import job_placement, load_processor, shut_down

if TYPE_CHECKING:
    from home_rl.memory_plan.run import Run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTOptions:
    route: str = "row"  # template (and HOME expert) each row trains with: row (its type) | think | fast | both (each row twice, once per template)
    think_sources: List[str] = dataclasses.field(default_factory=lambda: ["math"])  # data_source values that are reasoning data (their type is think)
    router_loss_weight: float = 0.0  # HOME models: weight of the router's cross-entropy on each row's type (the paper: 1.0)
    router_template: str = FAST  # which template's rendering of the prompt the router reads (the same for every row)
    max_response_tokens: int = 512  # reference responses longer than this are bad rows (unset: lowered with data.max_prompt_tokens to fit the model's context)

    CHOICES: ClassVar[dict] = {"route": ("row", THINK, FAST, "both"), "router_template": EXPERTS}


@dataclasses.dataclass
class SFTConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the dense or HOME checkpoint to fine-tune
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # rows with reference solutions (data.prompts_per_step rows per step)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)  # the DeepSpeed learner group
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)  # steps, checkpoints, resume
    sft: SFTOptions = dataclasses.field(default_factory=SFTOptions)  # what each row trains
    output_dir: str = "outputs/sft"  # config.yaml, metrics.jsonl, checkpoints/ and final/ go here

    def memory_run(self) -> "Run":
        """What this job runs, for the memory plan: learners only (an embedded model's name means its dense model)."""
        from home_rl.memory_plan.run import Run

        return Run(model_path=self.model.path, learner=self.learner, dtype=self.model.dtype,
                   prompt_tokens=self.data.max_prompt_tokens, response_tokens=self.sft.max_response_tokens)

    def resolve(self, given: frozenset[str] = frozenset()) -> "SFTConfig":
        """The lengths the user did not set, fitted to the model's context (home_rl/context_length.py): a
        sequence is a prompt and its response, so data.max_prompt_tokens + sft.max_response_tokens."""
        fit_lengths(self, ["data.max_prompt_tokens", "sft.max_response_tokens"], model_context(self.model.path), given)
        return self


# ----------------------------------------------------------------------------- rows -> sequences


def experts_for(row: dict, opts: SFTOptions) -> list[str]:
    if opts.route == "both":
        return [THINK, FAST]
    if opts.route in EXPERTS:
        return [opts.route]
    return [row_type(row, opts.think_sources)]


def _check_solution(row: dict, experts: list[str]) -> None:
    solution = solution_of(row)
    if not str(solution.get("answer") or "").strip():
        raise ValueError("no reference solution (solution.answer) to train on")
    if THINK in experts and not str(solution.get("think") or "").strip():
        # a string solution (TRL) or a bare answer teaches the fast template only
        raise ValueError(f"no worked trace (solution.think) for the think template, only an answer; "
                         f"sft.route={FAST} trains on answers alone")


def build_sequences(rows: list[dict], processor: Any, data_cfg: DataConfig, opts: SFTOptions,
                    is_home: bool, origins: Optional[dict] = None) -> dict[str, list[Sequence]]:
    """Row id -> its training sequences; rows without a usable reference solution follow data.on_bad_row.

    `origins` (LoadedData.origins) names each bad row by its file and line, as data loading does."""
    out: dict[str, list[Sequence]] = {}
    skipped = 0
    for row in rows:
        try:
            experts = experts_for(row, opts)
            _check_solution(row, experts)
            kind = row_type(row, opts.think_sources)
            seqs = []
            router = render_prompt(row, opts.router_template, processor, data_cfg) if opts.router_loss_weight else None
            for expert in experts:
                prompt = render_prompt(row, expert, processor, data_cfg)
                response = response_token_ids(processor, target_response(row, expert))
                if len(response) > opts.max_response_tokens:
                    raise ValueError(f"reference response is {len(response)} tokens for the {expert} template, "
                                     f"above sft.max_response_tokens={opts.max_response_tokens}")
                seqs.append(Sequence(
                    prompt_ids=prompt.prompt_token_ids, response_ids=response,
                    route=expert if is_home else None, mm_inputs=prompt.mm_inputs,
                    mm_token_type_ids=prompt.mm_token_type_ids,
                    router_label=EXPERT_INDEX[kind] if router is not None else None,
                    router_prompt_ids=router.prompt_token_ids if router is not None else None,
                    router_mm_token_type_ids=router.mm_token_type_ids if router is not None else None))
        except ValueError as e:
            origin = (origins or {}).get(row["id"])
            file, where = (origin.file, origin.where) if origin else (data_cfg.path, "")
            error = BadRowError(row["id"], file, str(e), where)
            if data_cfg.on_bad_row == "error":
                raise BadRowError(row["id"], file, f"{e} (set data.on_bad_row=skip to drop such rows)", where) from None
            skipped += 1
            if skipped <= data_cfg.log_bad_rows:
                log.warning("skipping %s", error)
            continue
        out[row["id"]] = seqs
    if skipped:
        log.warning("data %s: %d of %d rows skipped for SFT", data_cfg.path, skipped, len(rows))
    if not out:
        raise HomeRLError(f"no rows of {data_cfg.path} can be trained on by SFT")
    return out


# ----------------------------------------------------------------------------- the run


def run_sft(cfg: SFTConfig) -> Path:
    """Train, log, checkpoint and write `output_dir/final`; returns that folder."""
    from home_rl.learner.group import LearnerGroup
    from home_rl.model import is_home_checkpoint
    from home_rl.model.embedded import resolve_model_path

    if cfg.trainer.total_steps < 1:
        raise ConfigError(f"trainer.total_steps must be at least 1, got {cfg.trainer.total_steps}")
    model_dir = resolve_model_path(cfg.model.path)
    is_home = is_home_checkpoint(model_dir)
    if cfg.sft.router_loss_weight and not is_home:
        raise ConfigError("sft.router_loss_weight needs a HOME model; model.path is a dense checkpoint")
    processor = load_processor(model_dir)
    data = load_dataset(cfg.data, processor)
    sequences = build_sequences(data.rows, processor, cfg.data, cfg.sft, is_home, data.origins)
    rows = [r for r in data.rows if r["id"] in sequences]
    loader = PromptLoader(rows, cfg.data.prompts_per_step, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                          drop_last=cfg.data.drop_last, stratify_by=cfg.data.stratify_by)
    job = TrainingJob(cfg, model_dir, cfg.learner.num_learners * cfg.learner.resources.cpus)
    placement = group = None
    try:
        placement = job_placement(ClusterConfig(), learner=cfg.learner)
        group = LearnerGroup(cfg.learner, str(model_dir), cfg.model.dtype, cfg.trainer.total_steps, placement)
        log.info("SFT of %s (%s, %s) on %d rows (%d sequences per epoch), learners: %s", model_dir,
                 "HOME" if is_home else "dense", group.info[0]["dtype"], len(rows),
                 sum(len(s) for s in sequences.values()), group.info[0])
        return train_loop(cfg, job, group, loader, sequences)
    finally:
        shut_down(group, placement)
        job.close()


def train_loop(cfg: SFTConfig, job: TrainingJob, group, loader: PromptLoader,
               sequences: dict[str, list[Sequence]]) -> Path:
    """Steps from the checkpoint (or 0) to trainer.total_steps: metrics, checkpoints, then output_dir/final."""
    step = 0
    state = job.restore(group)
    if state is not None:
        step = state["step"]
        loader.load_state_dict(state["loader"])
        log.info("resumed from %s at step %d", job.resume_from, step)
    steps = job.step_log(step, "sft", step_line)
    try:
        while step < cfg.trainer.total_steps:
            batch = [s for row in loader.next_batch() for s in sequences[row["id"]]]
            metrics = group.train_step(batch, "sft", router_loss_weight=cfg.sft.router_loss_weight)
            step += 1
            metrics["epoch"] = loader.epoch
            steps.log(step, metrics)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < cfg.trainer.total_steps:
                job.checkpoint(step, group, {"loader": loader.state_dict()})
    finally:
        steps.close()
    return job.save_final(group)


def step_line(m: dict) -> str:
    """The console's words for an SFT step."""
    return f"loss {m['loss']:.4f}, grad_norm {m['grad_norm']:.3f}, lr {m['lr']:.2e}, {m['tokens_per_s']:.0f} tokens/s"
