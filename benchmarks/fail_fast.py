"""How fast the job fails when the cluster cannot host it (the resource check before any actor starts).

    python benchmarks/fail_fast.py [--runs 3]

Runs `recipes/grpo_think.py` on a tiny HOME model asking for 8 GPUs per rollout worker on this
machine, which has none, and times each run from process start to exit. Prints one JSON object:
seconds per run, their median, the part of it that is the check's own wait
(`cluster.resource_wait_s`), and the bare start-up of Python with the trainer's imports, so the
rest (Ray start, the model's processor, the data) can be read off.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return time.monotonic() - start, proc


def main(runs: int) -> dict:
    from home_rl.cluster import ClusterConfig
    from home_rl.model import upcycle
    from home_rl.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="fail_fast_"))
    home = upcycle(str(build_tiny_model("qwen2", root / "tiny"))).save_pretrained(root / "home")
    import_s, _ = timed([sys.executable, "-c", "import ray, home_rl.trainer.grpo_think"])
    seconds = []
    for i in range(runs):
        s, proc = timed([sys.executable, str(REPO / "recipes/grpo_think.py"), f"model.path={home}",
                         f"output_dir={root / f'run{i}'}", "synthetic_rows=8", "data.prompts_per_step=4",
                         "rollout.resources.gpus=8"])
        if proc.returncode != 2 or "GPU: no node has it" not in proc.stderr:
            raise SystemExit(f"run {i} did not fail on the resource check (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        seconds.append(round(s, 2))
    return {"runs_s": seconds, "median_s": round(statistics.median(seconds), 2), "resource_wait_s": ClusterConfig().resource_wait_s,
            "python_and_imports_s": round(import_s, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    print(json.dumps(main(parser.parse_args().runs)))
