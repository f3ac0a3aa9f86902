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
import time
from pathlib import Path
from typing import Any, ClassVar, List, Optional

from data_pipelines import DataConfig, PromptLoader, load_dataset, render_prompt, response_token_ids
from data_pipelines.schema import BadRowError
from data_pipelines.templates import solution_of, target_response
from home_rl.cluster import ClusterConfig
from home_rl.config import ModelConfig, save_config
from home_rl.errors import ConfigError, HomeRLError
from home_rl.experts import EXPERT_INDEX, EXPERTS, FAST, THINK, row_type
from home_rl.learner.batch import Sequence
from home_rl.learner.config import LearnerConfig
from home_rl.trainer.checkpoint import read_state, resolve_resume, save_checkpoint
from home_rl.trainer.config import TrainerConfig
from home_rl.trainer.startup import check_memory, ensure_ray, job_placement, load_processor

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTOptions:
    route: str = "row"  # template (and HOME expert) each row trains with: row (its type) | think | fast | both (each row twice, once per template)
    think_sources: List[str] = dataclasses.field(default_factory=lambda: ["math"])  # data_source values that are reasoning data (their type is think)
    router_loss_weight: float = 0.0  # HOME models: weight of the router's cross-entropy on each row's type (the paper: 1.0)
    router_template: str = FAST  # which template's rendering of the prompt the router reads (the same for every row)
    max_response_tokens: int = 512  # reference responses longer than this are bad rows

    CHOICES: ClassVar[dict] = {"route": ("row", THINK, FAST, "both"), "router_template": EXPERTS}


@dataclasses.dataclass
class SFTConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the dense or HOME checkpoint to fine-tune
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # rows with reference solutions (data.prompts_per_step rows per step)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)  # the DeepSpeed learner group
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)  # steps, checkpoints, resume
    sft: SFTOptions = dataclasses.field(default_factory=SFTOptions)  # what each row trains
    output_dir: str = "outputs/sft"  # config.yaml, metrics.jsonl, checkpoints/ and final/ go here


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
    out = Path(cfg.output_dir)
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
    cpus = cfg.learner.num_learners * cfg.learner.resources.cpus
    joined = check_memory(cfg, "sft", model_dir, cpus)  # before config.yaml: it records zero_stage=auto's pick
    save_config(cfg, out)

    resume_from = resolve_resume(out, cfg.trainer.resume)
    started_ray = ensure_ray(cpus) or joined
    try:
        placement = job_placement(ClusterConfig(), learner=cfg.learner)
        group = LearnerGroup(cfg.learner, str(model_dir), cfg.model.dtype, cfg.trainer.total_steps, placement)
        try:
            log.info("SFT of %s (%s, %s) on %d rows (%d sequences per epoch), learners: %s", model_dir,
                     "HOME" if is_home else "dense", group.info[0]["dtype"], len(rows),
                     sum(len(s) for s in sequences.values()), group.info[0])
            return train_loop(cfg, group, loader, sequences, resume_from)
        finally:
            group.shutdown()
            placement.shutdown()
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def train_loop(cfg: SFTConfig, group, loader: PromptLoader, sequences: dict[str, list[Sequence]],
               resume_from: Path | None) -> Path:
    """Steps from the checkpoint (or 0) to trainer.total_steps: metrics, checkpoints, then output_dir/final."""
    from home_rl.tracking import MetricsLogger, progress

    out = Path(cfg.output_dir)
    step = 0
    if resume_from is not None:
        state = read_state(resume_from)
        step = group.load_checkpoint(str(resume_from))
        if step != state["step"]:
            raise HomeRLError(f"checkpoint {resume_from} holds learner step {step} but trainer step {state['step']}")
        loader.load_state_dict(state["loader"])
        log.info("resumed from %s at step %d", resume_from, step)

    metrics_log = MetricsLogger(out, resume_step=step, tensorboard=cfg.trainer.tensorboard)
    bar = progress(cfg.trainer.total_steps, initial=step, desc="sft")
    try:
        while step < cfg.trainer.total_steps:
            batch = [s for row in loader.next_batch() for s in sequences[row["id"]]]
            metrics = group.train_step(batch, "sft", router_loss_weight=cfg.sft.router_loss_weight)
            step += 1
            metrics["epoch"] = loader.epoch
            metrics_log.log(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if step % max(cfg.trainer.log_every, 1) == 0 or step == cfg.trainer.total_steps:
                log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e tokens/s %.0f", step, cfg.trainer.total_steps,
                         metrics["loss"], metrics["grad_norm"], metrics["lr"], metrics["tokens_per_s"])
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < cfg.trainer.total_steps:
                save_checkpoint(out, step, group, {"loader": loader.state_dict()}, cfg.trainer.keep_checkpoints)
    finally:
        bar.close()
        metrics_log.close()
    start = time.perf_counter()
    final = Path(group.save_model(str(out / "final")))
    log.info("final model written to %s (%.1f s)", final, time.perf_counter() - start)
    return final
