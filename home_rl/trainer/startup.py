"""What every driver starts with: Ray, the checkpoint, the processor, and the reward pool's inputs.

One path for all of them (GRPO, SFT and the cold start, the router stage, the evaluation):

    started = ensure_ray(cpus_needed)          # join RAY_ADDRESS's cluster, or start a local runtime
    check_memory(cfg, home, cpus)  # every actor's predicted peak memory; learner.zero_stage=auto resolved
    placement = job_placement(cfg.cluster, learner=cfg.learner, rollout=cfg.rollout, reward=cfg.reward)
    home = resolve_home_checkpoint(path, key, make_it)
    processor = load_processor(home)
    scores, metrics = rewards.score(reward_inputs(rows, groups, expert))
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from home_rl.cluster import Bundle, ClusterConfig, ClusterResourceError, Placement
from home_rl.errors import ConfigError, HomeRLError
from home_rl.learner.config import LearnerConfig
from home_rl.resources import Resources
from home_rl.rollout.config import RolloutConfig
from reward.config import RewardConfig

log = logging.getLogger(__name__)


def ensure_ray(cpus_needed: float) -> bool:
    """Join the cluster of `ray job submit` (RAY_ADDRESS), or start a local runtime with enough logical CPUs.

    Ray schedules by logical CPUs: a local runtime declares at least what every actor asks for (they
    then share the machine's cores; each actor sizes its own threads). Returns whether this call
    connected, so that the caller disconnects when done; False when Ray was up already.
    """
    import ray

    from home_rl import console, leftovers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        return False
    start = time.perf_counter()
    # a recipe's console gets what actors print: everything (full), or their home-rl warnings (quiet: the
    # rest goes to each actor's file under output_dir/logs); library use keeps Ray's streams off
    log_to_driver = console.mode() is not None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        console.phase_done("ray", f"joined the cluster at {os.environ['RAY_ADDRESS']}", start)
        return True
    ended = leftovers.end_dead_sessions()  # what SIGKILLed local runs left behind (see home_rl/leftovers.py)
    if ended:
        log.info("ray: ended %s", leftovers.describe(ended))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private runtime of this process: no token to hand out
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed - 1e-9))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=log_to_driver,
             configure_logging=False)
    console.phase_done("ray", f"local runtime {cpus} CPUs", start)
    return True


def check_memory(cfg: Any, model_dir: str | Path, cpus_needed: float) -> bool:
    """The memory plan's check (home_rl/memory_plan/) beside the resource check, before any actor starts:
    a config whose actors cannot fit, or whose lengths exceed the model's context, is a ConfigError (exit 2)
    with one line naming the knob. learner.zero_stage=auto is resolved here, and only here, for a recipe: the
    stage memory_plan.resolve_zero_stage picks from the plan is written into cfg.learner.zero_stage.

    The config says what it runs (its memory_run()). The plan is for where the job runs: with RAY_ADDRESS the
    cluster, which is known only once joined, so this joins it first (ensure_ray; returns whether it
    connected); a local run is planned for this machine before Ray starts. Call it before save_config, so that config.yaml records the resolved stage."""
    from home_rl import console
    from home_rl.memory_plan import check_memory as plan_check

    started = ensure_ray(cpus_needed) if os.environ.get("RAY_ADDRESS") else False
    start = time.perf_counter()
    result = plan_check(cfg, model_dir)  # the plan at the stage auto resolves to (result.zero_stage)
    learner = getattr(cfg, "learner", None)
    if learner is not None and learner.zero_stage == "auto":
        learner.zero_stage = result.zero_stage
        learners = [a for a in result.actors if a.role == "learner"]
        fits = "the lowest stage that fits" if all(a.fits for a in learners) else "none fits: the most partitioned"
        log.info("memory: learner.zero_stage=auto chose ZeRO stage %d (%.1f GiB per learner, %s)",
                 result.zero_stage, learners[0].predicted_gib if learners else 0.0, fits)
    peaks = ", ".join(f"{a.role} {a.predicted_gib:.1f}/{a.available_gib:.0f} GiB" for a in result.actors
                      if a.role in ("learner", "rollout") or a.device == "host")
    console.phase_done("memory", f"plan {'fits' if result.fits else 'not checked (cluster.check_memory=false)'}: "
                                 f"{peaks}", start)
    return started


def shut_down(*parts: Any) -> None:
    """Shut down each part that was started (actor groups, pools, placements), best effort at exit: a dead actor
    must not hide the real error."""
    for part in parts:
        if part is None:
            continue
        try:
            part.shutdown()
        except Exception:
            log.exception("shutdown of %s failed", type(part).__name__)


def job_placement(cluster: ClusterConfig, learner: Optional[LearnerConfig] = None,
                  rollout: Optional[RolloutConfig] = None, reward: Optional[RewardConfig] = None,
                  others: Sequence[tuple[str, Resources, str]] = ()) -> Placement:
    """Every actor's bundle from its group's config, checked against the cluster before any actor starts.

    `others`: (owner, resources, config section) of single actors outside the groups (a router trainer).
    """
    import ray

    learners, workers, rest = [], [], []
    if learner is not None:
        gpus = learner.gpus_per_learner(ray.cluster_resources().get("GPU", 0))
        keys = "learner.num_learners, learner.resources.cpus, learner.device, learner.resources.node_resource"
        learners = [Bundle(learner.resources.bundle(gpus), f"learner {i}", keys) for i in range(learner.num_learners)]
    if rollout is not None:
        if cluster.mode == "colocated" and learner is not None and rollout.tensor_parallel_size > 1:
            raise ClusterResourceError("cluster.mode=colocated needs rollout.tensor_parallel_size=1 (one GPU per pair)")
        keys = "rollout.num_workers, rollout.resources.cpus, rollout.resources.gpus, rollout.resources.node_resource"
        workers = [Bundle(rollout.resources.bundle(), f"rollout worker {i}", keys) for i in range(rollout.num_workers)]
    if reward is not None:
        keys = "reward.num_workers, reward.resources.cpus, reward.resources.node_resource"
        rest = [Bundle(reward.resources.bundle(), f"reward worker {i}", keys) for i in range(reward.num_workers)]
    rest += [Bundle(res.bundle(), owner, f"{section}.resources") for owner, res, section in others]
    return Placement(cluster, learner=tuple(learners), rollout=tuple(workers), others=tuple(rest))


def resolve_home_checkpoint(path: str, key: str = "model.path", make_it: str = "", lora: Any = None) -> Path:
    """The HOME checkpoint named by config key `key`: a folder, or an embedded model's name (its cold start,
    built when missing; `lora`, a LoraSpec: with a LoRA think expert). A missing folder says what to run
    (`make_it`); a dense folder says how to upcycle it; a full think expert where `lora` asks for one is an error."""
    from home_rl.model import is_home_checkpoint
    from home_rl.model.embedded import EMBEDDED
    from home_rl.model.lora_expert import has_lora_think

    if path in EMBEDDED:
        from home_rl.trainer.cold_start import ensure_cold_start

        return Path(ensure_cold_start(path, lora=lora))
    folder = Path(path)
    if not (folder / "config.json").is_file():
        run = f"run {make_it} first, or give {key}=HOME_DIR" if make_it else f"give {key}=HOME_DIR"
        raise HomeRLError(f"{key}: no HOME checkpoint at {path}: {run}")
    if not is_home_checkpoint(folder):
        raise ConfigError(f"{key}={path} is a dense checkpoint: this recipe needs a HOME checkpoint "
                          f"(make one with recipes/upcycle.py model.path={path})")
    if lora is not None and not has_lora_think(folder):
        raise ConfigError(f"model.think_expert=lora, but the think expert of {key}={path} is a full one: upcycle a "
                          "dense model with recipes/upcycle.py model.think_expert=lora, or leave model.think_expert "
                          "at full (a checkpoint given decides itself)")
    return folder


def load_processor(model_dir: str | Path) -> Any:
    """The model's processor (vision-language models) or tokenizer (text models)."""
    import transformers

    from home_rl.model.architectures import architecture_of, read_config_json

    if architecture_of(read_config_json(model_dir)).multimodal:
        return transformers.AutoProcessor.from_pretrained(model_dir)
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def reward_inputs(rows: Sequence[dict], groups: Sequence[Sequence[Any]], expert: str,
                  prompts: Optional[Sequence[Any]] = None) -> list[dict]:
    """What the reward pool scores: every sample of `groups[i]` (answers to `rows[i]`) with its row's answer,
    source, extra_info, prompt and other columns, the answering expert named so the format verifier checks that
    expert's template; `prompts[i]` (RenderedPrompt) gives the templated prompt text that some styles read."""
    from reward.scoring import row_columns

    texts = [p.text for p in prompts] if prompts is not None else [None] * len(rows)
    return [{"id": f"{row['id']}#{expert}#{s.sample_index}", "response": s.text, "ground_truth": row["answer"],
             "data_source": row["data_source"], "extra_info": {**(row.get("extra_info") or {}), "expert": expert},
             "prompt": row.get("prompt"), "prompt_text": text, "response_ids": list(s.response_ids),
             "columns": row_columns(row)}
            for row, text, group in zip(rows, texts, groups) for s in group]
