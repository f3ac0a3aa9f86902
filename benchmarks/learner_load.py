"""Host memory of loading a HOME checkpoint into ZeRO-3 learners, the partitioned load against the in-memory one;
prints one JSON object.

    python benchmarks/learner_load.py --model smollm2 --learners 2

Each learner process reports its RSS just before loading, its peak RSS (VmHWM, reset just before loading)
after the load and after deepspeed.initialize, and the loading part: peak minus before. `old` is the load
of 590d013, kept here only to compare with: the whole model built in plain torch, every safetensors file
read into one state dict, frozen copies deep-copied, DeepSpeed partitioning at initialize. `new` is the
library's load_for_training: built inside deepspeed.zero.Init, filled one layer at a time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from home_rl.learner.worker import LearnerWorker


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """VmHWM back to the current RSS (Linux: write 5 to clear_refs); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def in_memory_load(path, dtype: torch.dtype, ds_config: dict, frozen_copies: list[str]):
    """The HOME learner load of 590d013 (see the module docstring)."""
    from safetensors.torch import load_file

    from home_rl.model import HomeModel
    from home_rl.model.home import read_home_config

    config, home_config = read_home_config(Path(path))
    model = HomeModel.from_config(config, home_config, dtype)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    own = model.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    del state, own
    for item in frozen_copies:
        name, _, expert = item.partition("=")
        for mlp in model.hybrid_mlps:
            clone = copy.deepcopy(mlp.experts[expert])
            clone.requires_grad_(False)
            mlp.experts[name] = clone
    for mlp in model.hybrid_mlps:
        mlp.call_every_expert = True
    return model.train(), True


class MeasuredWorker(LearnerWorker):
    """A learner whose setup measures its own memory around the load."""

    old = False

    def setup(self, *args, **kwargs) -> dict:
        import home_rl.learner.model_io as model_io

        load = in_memory_load if self.old else model_io.load_for_training
        marks: dict = {}

        def measured(*a, **kw):
            marks["rss_before_mb"] = _status_mb("VmRSS")
            marks["peak_reset"] = _reset_peak()
            start = time.perf_counter()
            out = load(*a, **kw)
            marks["load_s"] = round(time.perf_counter() - start, 2)
            marks["peak_after_load_mb"] = _status_mb("VmHWM")
            marks["rss_after_load_mb"] = _status_mb("VmRSS")  # what the loaded model holds, without transients
            return out

        model_io.load_for_training = measured
        info = super().setup(*args, **kwargs)
        peak = _status_mb("VmHWM")
        before = marks["rss_before_mb"]
        return {"rank": info["rank"], "pid": os.getpid(), "dtype": info["dtype"], "params": info["total"],
                "rss_before_mb": round(before), "peak_after_load_mb": round(marks["peak_after_load_mb"]),
                "peak_mb": round(peak), "loading_mb": round(peak - before),
                "loading_before_initialize_mb": round(marks["peak_after_load_mb"] - before),
                "rss_after_load_mb": round(marks["rss_after_load_mb"]), "rss_after_mb": round(_status_mb("VmRSS")), "load_s": marks["load_s"], "setup_s": info["setup_s"],
                "peak_reset": marks["peak_reset"]}


class OldPathWorker(MeasuredWorker):
    old = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a HOME checkpoint folder or an embedded model's name")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--learners", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trainable", default="think")
    ap.add_argument("--frozen-copies", default="think_ref=think", help="comma-separated NAME=EXPERT ('' for none)")
    ap.add_argument("--paths", default="old,new")
    args = ap.parse_args()

    import home_rl.learner.group as group_module
    from home_rl.learner import LearnerConfig, LearnerGroup
    from home_rl.resources import Resources
    from home_rl.trainer.startup import ensure_ray, resolve_home_checkpoint

    others = subprocess.run(["pgrep", "-af", "pytest|recipes/"], capture_output=True, text=True).stdout.splitlines()
    home = resolve_home_checkpoint(args.model)
    ensure_ray(args.learners)
    cfg = LearnerConfig(num_learners=args.learners, zero_stage=3, trainable=args.trainable,
                        frozen_copies=[c for c in args.frozen_copies.split(",") if c],
                        resources=Resources(threads=args.threads))
    result: dict = {"model": args.model, "checkpoint": str(home), "learners": args.learners,
                    "checkpoint_mb": round(sum(f.stat().st_size for f in home.glob("*.safetensors")) / 2 ** 20),
                    "frozen_copies": cfg.frozen_copies, "trainable": args.trainable}
    for path in args.paths.split(","):
        group_module.LearnerWorker = OldPathWorker if path == "old" else MeasuredWorker  # what LearnerGroup starts
        group = LearnerGroup(cfg, str(home), args.dtype)
        result[path] = sorted(group.info, key=lambda r: r["rank"])
        group.shutdown()
        time.sleep(2)  # the killed actors' memory back before the next group
    if "old" in result and "new" in result:
        result["loading_ratio_new_over_old"] = [round(n["loading_mb"] / o["loading_mb"], 3)
                                                for o, n in zip(result["old"], result["new"])]
    result["other_heavy_processes_at_start"] = [line[:160] for line in others if str(os.getpid()) not in line]
    result["load_avg_1min"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
