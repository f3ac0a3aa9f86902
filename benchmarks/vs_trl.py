"""home-rl's GRPO step against TRL's GRPOTrainer on the same work, one after the other in one run.

    pip install --no-deps --target /tmp/trl trl==1.16.0    # TRL beside the pinned stack, nothing else changed
    python benchmarks/vs_trl.py --trl-path /tmp/trl [--steps 4] [key=value ...]

The work: the embedded default's steps with zero-variance filtering off, so that each step is 16 prompts x
4 samples of the cold-started SmolLM2 think view. home-rl runs them as `recipes/grpo_think.py` does (2
DeepSpeed learners, 1 vLLM worker, 1 reward worker, on this machine's cores; overrides apply to this side).
TRL then gets the same starting model (the think view: a dense checkpoint), the very prompts home-rl's steps
drew, rendered by the same template, in the same order, the same reward (home-rl's math verifier plus 0.1 x
its format verifier, as a TRL reward function), sampling (temperature, max new tokens), learning rate,
clipping (0.2 / 0.28, DAPO's token-mean loss), gradient clipping and one on-policy pass with no KL
(`num_iterations=1`, `beta=0`), micro-batches of the same size. It runs in its own process on the same
cores, generating with transformers (TRL's path without vLLM, whose server mode needs CUDA). The first step
of each side is warm-up and left out. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def home_rl_side(steps: int, out: Path, overrides: list[str]) -> dict:
    """Run home-rl's steps; write the TRL side's inputs (prompts in step order, model folder) under `out`."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():  # before transformers imports deepspeed, whose accelerator probe prints to stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from data_pipelines.render import render_prompt
    from home_rl.config import load_config
    from home_rl.experts import THINK
    from home_rl.trainer.grpo_think import GRPOThinkConfig, GRPOThinkTrainer
    from home_rl.trainer.rollout_side import export_think_view

    cfg = load_config(GRPOThinkConfig, [f"trainer.total_steps={steps}", "trainer.save_every=0", "trainer.resume=never",
                                        "algorithm.filter_zero_variance=false", "eval.rows=0",
                                        f"output_dir={out / 'home_rl'}", *overrides])
    trainer = GRPOThinkTrainer(cfg)
    drawn: list[dict] = []
    next_batch = trainer.rollout.loader.next_batch

    def recording():
        rows = next_batch()
        drawn.extend(rows)
        return rows

    trainer.rollout.loader.next_batch = recording
    metrics = []
    try:
        while trainer.step < steps:
            metrics.append(trainer.train_step())
        prompts = [{"prompt": render_prompt(row, THINK, trainer.rollout.processor, cfg.data).text, "answer": row["answer"],
                    "data_source": row["data_source"], "extra_info": row.get("extra_info") or {}} for row in drawn]
        model = export_think_view(trainer.home_dir, trainer.out).wait()
    finally:
        trainer.shutdown()
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    measured = metrics[1:] or metrics
    return {"model": str(model), "step_s": [round(m["timing/step_s"], 2) for m in metrics],
            "step_s_mean": round(float(np.mean([m["timing/step_s"] for m in measured])), 2),
            "update_s_mean": round(float(np.mean([m["timing/update_s"] for m in measured])), 2),
            "rollout_s_mean": round(float(np.mean([m["timing/rollout_s"] for m in measured])), 2),
            "response_length_mean": round(float(np.mean([m["response_length/mean"] for m in measured])), 1),
            "reward_mean": round(float(np.mean([m["reward/mean"] for m in metrics])), 3),
            "prompts_per_step": cfg.data.prompts_per_step, "n": cfg.rollout.n,
            "settings": {"lr": cfg.learner.lr, "max_response_tokens": cfg.rollout.max_response_tokens,
                         "temperature": cfg.rollout.temperature, "micro_batch_size": cfg.learner.micro_batch_size,
                         "grad_clip": cfg.learner.grad_clip, "clip_ratio_low": cfg.algorithm.clip_ratio_low,
                         "clip_ratio_high": cfg.algorithm.clip_ratio_high, "shared_prefix": cfg.learner.shared_prefix,
                         "seed": cfg.seed}}


def trl_side(model: str, prompts_file: str, steps: int, settings: dict, prompts_per_step: int, n: int, out: str) -> dict:
    """TRL's GRPOTrainer on the same prompts (run in its own process, with TRL importable)."""
    import datasets
    import numpy as np
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from reward.registry import get_verifier

    math, fmt = get_verifier("math"), get_verifier("format")

    def score(value) -> float:
        return float(value["score"] if isinstance(value, dict) else value)

    def home_rl_reward(completions, answer, data_source, extra_info, **_) -> list[float]:
        return [score(math(c, a, data_source=s, extra_info=e)) + 0.1 * score(fmt(c, a, data_source=s, extra_info=e))
                for c, a, s, e in zip(completions, answer, data_source, extra_info)]

    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines()]
    micro = settings["micro_batch_size"]
    args = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=prompts_per_step * n // micro,  # one optimizer step per 16 x 4 samples
        num_generations=n, num_iterations=1, beta=0.0, learning_rate=settings["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=settings["grad_clip"], epsilon=settings["clip_ratio_low"],
        epsilon_high=settings["clip_ratio_high"], loss_type="dapo", temperature=settings["temperature"],
        max_completion_length=settings["max_response_tokens"], shuffle_dataset=False, use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", seed=settings["seed"],
        disable_tqdm=True)
    model_obj = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    times: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer = GRPOTrainer(model=model_obj, reward_funcs=home_rl_reward, args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[StepTimes()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    measured = times[1:] or times
    return {"step_s": [round(t, 2) for t in times], "step_s_mean": round(float(np.mean(measured)), 2),
            "completion_length_mean": round(float(np.mean([h["completions/mean_length"] for h in logs])), 1),
            "reward_mean": round(float(np.mean([h["reward"] for h in logs])), 3), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-path", default="", help="a folder holding the trl package (pip install --target), if not installed")
    ap.add_argument("--steps", type=int, default=4, help="steps per side (the first is warm-up, left out)")
    ap.add_argument("--trl-side", nargs=3, metavar=("MODEL", "PROMPTS", "SETTINGS_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of home-rl's run")
    args = ap.parse_args()
    if args.trl_side:
        model, prompts, settings = args.trl_side
        s = json.loads(settings)
        with tempfile.TemporaryDirectory(prefix="trl_grpo_") as out:
            print(json.dumps(trl_side(model, prompts, args.steps, s["settings"], s["prompts_per_step"], s["n"], out)))
        return
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        tmp = Path(tmp)
        ours = home_rl_side(args.steps, tmp, args.overrides)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (args.trl_path, str(REPO),
                                                                       os.environ.get("PYTHONPATH", "")) if p)}
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--trl-side", ours["model"],
                               str(tmp / "prompts.jsonl"), json.dumps(ours)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the TRL side failed:\n{proc.stderr[-3000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours.pop("model")
    print(json.dumps({"benchmark": "vs_trl", "steps": args.steps, "home_rl": ours, "trl": theirs,
                      "speedup": round(theirs["step_s_mean"] / ours["step_s_mean"], 2)}))


if __name__ == "__main__":
    main()
