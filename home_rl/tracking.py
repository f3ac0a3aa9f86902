"""Metrics sinks of a training run: one JSON object per step in metrics.jsonl, TensorBoard, a progress bar.

On resume the run continues from its checkpoint's step: lines of metrics.jsonl past that step
(written after the checkpoint by the run that was killed) are dropped, and TensorBoard purges
the same steps, so the loss curve continues from the saved step without a fork.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a per-step JSONL file (metrics.jsonl, eval.jsonl) up to `step`: a resumed run drops what
    the killed run wrote after its checkpoint, and a last line cut off by the kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class PhaseTimer:
    """Seconds per named phase of a step (a phase entered twice adds up), as `timing/<phase>_s` metrics.

        timer = PhaseTimer()
        with timer("rollout"): ...
        metrics.update(timer.metrics())      # {"timing/rollout_s": ..., "timing/step_s": since the timer was made}
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def metrics(self) -> dict[str, float]:
        return {**{f"timing/{k}_s": v for k, v in self.seconds.items()}, "timing/step_s": self.elapsed()}


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def progress(total: int, initial: int = 0, desc: str = "train", disable: Optional[bool] = None):
    """A tqdm bar over optimizer steps (silent when stderr is not a terminal unless HOME_RL_PROGRESS=1)."""
    import os
    import sys

    from tqdm import tqdm

    if disable is None:
        disable = not (sys.stderr.isatty() or os.environ.get("HOME_RL_PROGRESS") == "1")
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=disable)
