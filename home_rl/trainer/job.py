"""The skeleton every training driver shares (GRPO, SFT and the cold start): one path from start to final save.

    job = TrainingJob(cfg, model_dir, cpus)   # memory check, config.yaml, Ray (joined or started)
    learner = LearnerGroup(...)
    state = job.restore(learner)                      # the resume checkpoint's trainer state (None: a new run)
    steps = job.step_log(first_step, "sft", line)     # metrics.jsonl, TensorBoard, a console line per step
    ...
    job.checkpoint(step, learner, state)              # atomic; records the learners' own step
    final = job.save_final(learner)                   # output_dir/final
    job.close()                                       # stops the Ray runtime this job started

A resumed run checks that the learners' optimizer step is the one the checkpoint recorded beside the
trainer's, so a checkpoint whose parts disagree (a partial copy, a folder of another run) stops the
run instead of training from a state that never existed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from home_rl.config import save_config
from home_rl.errors import HomeRLError
from home_rl.trainer.checkpoint import read_state, resolve_resume, save_checkpoint
from home_rl.trainer.startup import check_memory, ensure_ray

log = logging.getLogger(__name__)


class TrainingJob:
    def __init__(self, cfg: Any, model_dir: str | Path, cpus: float):
        """Plan memory (learner.zero_stage=auto resolved), write config.yaml, then join or start Ray."""
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        joined = check_memory(cfg, model_dir, cpus)  # before config.yaml: it records the resolved stage
        save_config(cfg, self.out)
        self.resume_from = resolve_resume(self.out, cfg.trainer.resume)
        self.started_ray = ensure_ray(cpus) or joined

    def restore(self, learner: Any) -> Optional[dict]:
        """Load the resume checkpoint into the learners; its trainer state, or None for a new run."""
        if self.resume_from is None:
            return None
        state = read_state(self.resume_from)
        learner_step = learner.load_checkpoint(str(self.resume_from))
        expected = state.get("learner_step", state["step"])
        if learner_step != expected:
            raise HomeRLError(f"checkpoint {self.resume_from} holds learner step {learner_step} but its trainer "
                              f"state says {expected} (trainer step {state['step']}): it is not one run's checkpoint")
        return state

    def checkpoint(self, step: int, learner: Any, state: dict, files: Optional[dict[str, bytes]] = None) -> Path:
        """Checkpoint `step` atomically: the learners, `state` with the learners' own step, and `files`."""
        return save_checkpoint(self.out, step, learner, {**state, "learner_step": learner.global_step},
                               self.cfg.trainer.keep_checkpoints, files)

    def step_log(self, first_step: int, name: str, line: Callable[[dict], str]) -> "StepLog":
        t = self.cfg.trainer
        return StepLog(self.out, name, first_step, t.total_steps, t.log_every, t.tensorboard, line)

    def save_final(self, learner: Any) -> Path:
        start = time.perf_counter()
        final = Path(learner.save_model(str(self.out / "final")))
        log.info("final model written to %s (%.1f s)", final, time.perf_counter() - start)
        return final

    def close(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


class StepLog:
    """Each step's metrics to metrics.jsonl and TensorBoard, and every `every` steps one console line:
    "grpo step 3/20: reward 0.573 ... | 74 s/step, 21 min left" (the time left from this run's steps so far)."""

    def __init__(self, out: Path, name: str, first_step: int, total_steps: int, every: int, tensorboard: bool,
                 line: Callable[[dict], str]):
        from home_rl.tracking import MetricsLogger

        self.metrics = MetricsLogger(out, resume_step=first_step, tensorboard=tensorboard)
        self.name, self.first_step, self.total, self.every, self.line = name, first_step, total_steps, every, line
        self.start = time.perf_counter()

    def restart_clock(self) -> None:
        """Steps are timed from now (after a phase that is not a step: the baseline evaluation)."""
        self.start = time.perf_counter()

    def record(self, step: int, metrics: dict) -> None:
        """To metrics.jsonl and TensorBoard only (what is measured before the first step is step 0)."""
        self.metrics.log(step, metrics)

    def log(self, step: int, metrics: dict) -> None:
        self.metrics.log(step, metrics)
        if self.every and (step % self.every == 0 or step == self.total):
            per_step = (time.perf_counter() - self.start) / max(step - self.first_step, 1)
            left = (self.total - step) * per_step
            log.info("%s step %d/%d: %s | %.0f s/step, %s left", self.name, step, self.total, self.line(metrics),
                     per_step, duration(left))

    def close(self) -> None:
        self.metrics.close()


def duration(seconds: float) -> str:
    """A short human duration: 45 s, 12 min, 1 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
