"""Both experts answer every prompt: one set of vLLM rollout workers serves the fast view, then the think view.

The fast view is exported from the HOME checkpoint by the actor that holds it and served; after
the fast samples, the engines receive the think expert's MLP tensors through the same weight
update path GRPO uses, and serve the think view. The views differ only in those tensors, so one
engine start (minutes for a large model) serves both, and only one set of engines holds memory.
Each prompt is rendered with the template of the expert that answers it, and its samples are
scored with that expert named in extra_info, so the format verifier checks the right template.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from data_pipelines import DataConfig, render_prompt
from home_rl.rollout.config import RolloutConfig
from home_rl.experts import FAST, THINK
from home_rl.router.labels import ExpertStats, expert_stats
from home_rl.resources import Resources
from home_rl.trainer.startup import check_memory, ensure_ray, job_placement, reward_inputs
from reward.config import RewardConfig

log = logging.getLogger(__name__)

CHUNK_PROMPTS = 64  # prompts per generate call: a progress bar that moves (prompts done), bounded memory per call


@dataclasses.dataclass(frozen=True)
class SampledPass:
    """A second set of answers per expert, sampled, besides the rollout config's (the evaluation's k samples)."""
    n: int  # samples per prompt and expert
    temperature: float  # their sampling temperature


@dataclasses.dataclass
class BothExperts:
    rows: list[dict]  # the rows both experts answered (a row skipped by either is dropped)
    stats: dict[str, list[ExpertStats]]  # expert -> one ExpertStats per row of `rows`
    responses: dict[str, list[list[str]]]  # expert -> per row, the sample texts
    timing: dict[str, float]  # seconds: view export, weight swap, rollout and scoring per expert
    sampled: dict[str, list[ExpertStats]] = dataclasses.field(default_factory=dict)  # the SampledPass's, when asked


class ViewsRun:
    """The actors of a run in which both views answer (the router stage, the evaluation): placed and checked
    up front, the HomeModelActor holding the HOME checkpoint, and a reward pool once `answer` scores.

        with ViewsRun(checkpoint, cfg.rollout, cfg.reward, cfg.actor.resources, out / "views") as run:
            info = ray.get(run.home.info.remote())
            both = run.answer(rows, processor, cfg.data, cfg.seed)
    """

    def __init__(self, checkpoint: Path, rollout: Optional[RolloutConfig], reward: RewardConfig, actor: Resources,
                 views_dir: Path, plan_cfg: Any = None):
        """`rollout` None: no view answers (the router stage fitting given labels), no rollout worker is placed.
        `plan_cfg`: the recipe's config, whose memory plan is checked before any actor starts."""
        from home_rl.cluster import ClusterConfig
        from home_rl.router.actor import start_home_model_actor

        self.rollout_cfg, self.reward_cfg, self.views_dir = rollout, reward, views_dir
        workers = rollout.num_workers * rollout.resources.cpus if rollout else 0
        cpus = workers + reward.num_workers * reward.resources.cpus + actor.cpus
        if plan_cfg is not None:
            check_memory(plan_cfg, checkpoint, cpus)
        ensure_ray(cpus)
        self.placement = job_placement(ClusterConfig(), rollout=rollout, reward=reward,
                                       others=[("HOME model actor", actor, "actor")])
        self.rewards = None
        try:
            self.home = start_home_model_actor(str(checkpoint), actor)
        except BaseException:
            self.placement.shutdown()
            raise

    def answer(self, rows: Sequence[dict], processor: Any, data_cfg: DataConfig, seed: int,
               sampled: Optional[SampledPass] = None) -> "BothExperts":
        """Both views' scored samples for every row (the reward pool checks the rows' sources first), and the
        `sampled` pass's from the same engines."""
        from reward import RewardPool

        assert self.rollout_cfg is not None, "ViewsRun(rollout=None) places no rollout workers"
        self.rewards = self.rewards or RewardPool(self.reward_cfg)
        self.rewards.check(rows)
        return rollout_both(self.home, rows, processor, data_cfg, self.rollout_cfg, self.rewards, self.views_dir,
                            seed, placement=self.placement, sampled=sampled)

    def features(self, items: Sequence[dict], batch_size: int, desc: str = "router features",
                 candidates: Optional[list[tuple[int, str]]] = None) -> Any:
        """[N, hidden] router features of router inputs from the HomeModelActor (with `candidates`, a dict of
        them per (layer, pooling)), CHUNK_PROMPTS prompts per call so a progress bar moves, and a log line with
        the time it took."""
        import ray
        import torch

        from home_rl.tracking import progress

        start, parts = time.perf_counter(), []
        with progress(len(items), desc=desc) as bar:
            for first in range(0, len(items), CHUNK_PROMPTS):
                chunk = list(items[first:first + CHUNK_PROMPTS])
                parts.append(ray.get(self.home.features.remote(chunk, batch_size, candidates)))
                bar.update(len(chunk))
        seconds = time.perf_counter() - start
        log.info("%s: %d prompts in %.1f s (%.3f s a prompt)", desc, len(items), seconds, seconds / max(len(items), 1))
        if candidates:
            return {c: torch.cat([part[c] for part in parts]) for c in candidates}
        return torch.cat(parts)

    def __enter__(self) -> "ViewsRun":
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.rewards is not None:
            self.rewards.shutdown()
        ray.kill(self.home)
        self.placement.shutdown()
        shutil.rmtree(self.views_dir, ignore_errors=True)


def rollout_both(home: Any, rows: Sequence[dict], processor: Any, data_cfg: DataConfig, rollout_cfg: RolloutConfig,
                 rewards: Any, views_dir: Path, seed: int = 0, experts: Sequence[str] = (FAST, THINK),
                 placement: Any = None, sampled: Optional[SampledPass] = None) -> BothExperts:
    """n samples per prompt from each expert's view, scored, and the `sampled` pass's; `home` is a
    HomeModelActor (it exports the views)."""
    import ray

    from home_rl.rollout import RolloutPool
    from home_rl.weights import ActorSender

    per_expert: dict[str, tuple[list, list]] = {}
    per_expert_sampled: dict[str, list] = {}
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    view = ray.get(home.export_view.remote(experts[0], str(Path(views_dir) / experts[0])))
    timing["export_s"] = time.perf_counter() - t0
    pool = RolloutPool(view, rollout_cfg, placement)
    try:
        if len(experts) > 1:  # the actor sends the next view's MLP tensors straight to the engines
            pool.attach(ActorSender(home))
        for version, expert in enumerate(experts):
            t1 = time.perf_counter()
            if version:  # the engines now serve `expert`'s view: only its MLP tensors differ from the last one's
                ray.get(home.stage_expert.remote(version, expert))
                pool.sync(version)
                timing[f"{expert}/weight_swap_s"] = time.perf_counter() - t1
            rendered = [render_prompt(row, expert, processor, data_cfg, with_pixels=False) for row in rows]
            groups = _generate(pool, rendered, rollout_cfg.n, None, seed, f"rollout {expert}")
            t2 = time.perf_counter()
            stats = _score(rewards, rows, groups, expert, rendered)
            per_expert[expert] = (stats, [[s.text for s in group] for group in groups])
            timing.update({f"{expert}/rollout_s": t2 - t1, f"{expert}/reward_s": time.perf_counter() - t2})
            log.info("%s view: %d prompts x %d samples, mean accuracy %.3f, mean length %.1f tokens (%.0fs)", expert,
                     len(rows), rollout_cfg.n, _mean([s.accuracy for s in stats if s.n]),
                     _mean([s.mean_tokens for s in stats if s.n]), t2 - t1)
            if sampled is not None:
                t3 = time.perf_counter()
                groups = _generate(pool, rendered, sampled.n, {"temperature": sampled.temperature}, seed + 1,
                                   f"rollout {expert}, {sampled.n} sampled")
                per_expert_sampled[expert] = _score(rewards, rows, groups, expert, rendered)
                timing[f"{expert}/sampled_s"] = time.perf_counter() - t3
    finally:
        pool.shutdown()
        shutil.rmtree(view, ignore_errors=True)  # a view is a whole dense model: do not leave it behind

    keep = [i for i in range(len(rows)) if all(per_expert[e][0][i].n for e in experts)]
    if len(keep) < len(rows):
        log.warning("%d of %d prompts got no samples from an expert (rollout.on_long_prompt=skip) and are left out",
                    len(rows) - len(keep), len(rows))
    if sampled is not None:  # a row needs the sampled pass's answers too
        keep = [i for i in keep if all(per_expert_sampled[e][i].n for e in experts)]
    return BothExperts(rows=[rows[i] for i in keep],
                       stats={e: [per_expert[e][0][i] for i in keep] for e in experts},
                       responses={e: [per_expert[e][1][i] for i in keep] for e in experts}, timing=timing,
                       sampled={e: [per_expert_sampled[e][i] for i in keep] for e in per_expert_sampled})


def _generate(pool: Any, rendered: list, n: int, sampling: Optional[dict], seed: int, desc: str) -> list:
    """n samples per rendered prompt, CHUNK_PROMPTS prompts per call, with a progress bar."""
    from home_rl.tracking import progress

    groups: list = []
    with progress(len(rendered), desc=desc) as bar:
        for start in range(0, len(rendered), CHUNK_PROMPTS):
            result = pool.generate(rendered[start:start + CHUNK_PROMPTS], n=n, sampling=sampling, seed=seed + start)
            groups += result.samples
            bar.update(len(result.samples))
    return groups


def _score(rewards: Any, rows: Sequence[dict], groups: list, expert: str, rendered: list) -> list[ExpertStats]:
    """Each prompt's samples scored by the reward pool (with `expert` named, for the format verifier)."""
    to_score = reward_inputs(rows, groups, expert, rendered)
    scores, _ = rewards.score(to_score) if to_score else ([], {})
    it = iter(scores)
    return [expert_stats([next(it) for _ in group], [len(s.response_ids) for s in group]) for group in groups]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
