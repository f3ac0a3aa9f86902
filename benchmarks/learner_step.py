"""Learner step time on the embedded SmolLM2-135M with SFT sequences of the synthetic mix; prints one JSON object.

    python benchmarks/learner_step.py --learners 1 --threads 2 --micro 16 --batch 32 --steps 3

The first step (warm-up: allocator, thread pools) is reported apart from the mean of the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--learners", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    from data_pipelines import DataConfig, read_rows
    from data_pipelines.synthetic import generate
    from home_rl.learner import LearnerConfig, LearnerGroup
    from home_rl.resources import Resources
    from home_rl.trainer.sft import SFTOptions, build_sequences
    from home_rl.trainer.startup import ensure_ray, load_processor
    from home_rl.model.embedded import resolve_model_path

    model_dir = resolve_model_path(args.model)
    data = generate("mix", args.batch, seed=0, out=tempfile.mkdtemp(), ratio={"math": 0.5, "extract": 0.5})
    seqs = build_sequences(read_rows(data), load_processor(model_dir), DataConfig(path=str(data)),
                           SFTOptions(route="both"), False)
    batch = [s for v in seqs.values() for s in v][:args.batch]
    ensure_ray(args.learners)
    cfg = LearnerConfig(num_learners=args.learners, micro_batch_size=args.micro, resources=Resources(threads=args.threads),
                        lr=1e-5)
    start = time.perf_counter()
    group = LearnerGroup(cfg, str(model_dir), args.dtype, total_steps=args.steps)
    setup_s = time.perf_counter() - start
    times, tokens = [], 0
    for _ in range(args.steps):
        m = group.train_step(batch)
        times.append(m["step_s"])
        tokens = m["tokens"]
    group.shutdown()
    rest = times[1:] or times
    print(json.dumps({"model": args.model, "dtype": group.info[0]["dtype"], "learners": args.learners,
                      "threads_per_learner": args.threads, "micro_batch_size": args.micro,
                      "sequences_per_step": len(batch), "tokens_per_step": tokens, "setup_s": round(setup_s, 1),
                      "first_step_s": round(times[0], 2), "step_s": round(statistics.mean(rest), 2),
                      "tokens_per_s": round(tokens / statistics.mean(rest), 1), "load_avg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
