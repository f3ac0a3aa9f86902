"""Predicted vs measured peak memory on this machine (home_rl/memory_plan/); prints one JSON object.

    flock /tmp/heavy.lock python benchmarks/memory_plan.py                 # every case
    flock /tmp/heavy.lock python benchmarks/memory_plan.py --cases grpo_micro4 rollout
    python benchmarks/memory_plan.py --measured OUT.jsonl    # an earlier run's measurements, predicted again

Cases: the embedded default's 2 GRPO learners (smollm2 HOME, think trains) at several micro-batch sizes (and
token budgets once `learner.max_tokens_per_micro_batch` exists), its vLLM worker, and the SFT cold start's
learner (dense smollm2, everything trains). Each learner case runs two optimizer steps on synthetic sequences of
the planned worst-case shape (data.max_prompt_tokens + the response limit, every sequence that long), so the
measured peak is the one the plan predicts. Measured: VmHWM (peak resident set) of each actor process, read
from /proc/<pid>/status inside the actor; the largest over a group's actors is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

GIB = 2 ** 30
# The planned shapes: short prompts keep one step of two learners within this 2-core, 24 GiB machine.
PROMPT_TOKENS, RESPONSE_TOKENS = 96, 160


def _status(actor) -> dict[str, float]:
    """VmHWM and VmRSS (GiB) of a Ray actor's process, read inside it."""
    import ray

    def read(self):  # noqa: ARG001  runs in the actor
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024 / GIB
        return fields

    return ray.get(actor.__ray_call__.remote(read))


def _sequences(count: int, prompt: int, response: int, vocab: int) -> list:
    import random

    from home_rl.learner.batch import Sequence

    rng = random.Random(0)
    return [Sequence(prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt)],
                     response_ids=[rng.randrange(3, vocab) for _ in range(response)],
                     token_data={"advantages": [rng.uniform(-1, 1) for _ in range(response)]})
            for _ in range(count)]


def grpo_config(overrides: list[str]):
    from home_rl.config import load_config
    from home_rl.trainer.grpo_config import GRPOThinkConfig

    base = [f"data.max_prompt_tokens={PROMPT_TOKENS}", f"rollout.max_response_tokens={RESPONSE_TOKENS}",
            f"output_dir={tempfile.mkdtemp()}"]
    return load_config(GRPOThinkConfig, base + overrides)


def sft_config(overrides: list[str]):
    from home_rl.config import load_config
    from home_rl.trainer.cold_start import cold_start_config
    from home_rl.config import to_dict
    from omegaconf import OmegaConf
    from home_rl.trainer.sft import SFTConfig

    # the cold start's own config (dense smollm2, 1 learner of micro-batch 4) at the planned shape
    cfg = to_dict(cold_start_config("smollm2", tempfile.mkdtemp(), tempfile.mkdtemp()))
    path = os.path.join(tempfile.mkdtemp(), "sft.yaml")
    OmegaConf.save(OmegaConf.create(cfg), path)
    base = [f"data.max_prompt_tokens={PROMPT_TOKENS}", f"sft.max_response_tokens={RESPONSE_TOKENS}"]
    return load_config(SFTConfig, ["--config", path, *base, *overrides])


def measure_learners(cfg, model_dir: str, response: int, loss) -> dict:
    """One optimizer step of the config's learner group on sequences of the planned shape; peak per actor."""
    from home_rl.learner import LearnerGroup

    learner = cfg.learner
    budget = getattr(learner, "max_tokens_per_micro_batch", 0)
    prompt = cfg.data.max_prompt_tokens
    per_micro = max(1, budget // (prompt + response)) if budget else learner.micro_batch_size
    count = per_micro * learner.num_learners  # one full micro-batch per rank: the planned worst case
    start = time.perf_counter()
    group = LearnerGroup(learner, model_dir, cfg.model.dtype, total_steps=3)
    try:
        after_setup = [_status(a) for a in group.actors]
        batch = _sequences(count, prompt, response, vocab=49152)
        # two steps: AdamW's states appear at the end of the first, so only the second holds them and the
        # activations at once (the peak of every later step of a run)
        for _ in range(2):
            group.train_step(batch, loss=loss)
        after_step = [_status(a) for a in group.actors]
    finally:
        group.shutdown()
    return {"setup_hwm_gib": round(max(s["VmHWM"] for s in after_setup), 3),
            "setup_rss_gib": round(max(s["VmRSS"] for s in after_setup), 3),
            "measured_gib": round(max(s["VmHWM"] for s in after_step), 3),
            "dtype": group.info[0]["dtype"], "seconds": round(time.perf_counter() - start, 1)}


def measure_rollout(cfg, home_dir) -> dict:
    from home_rl.rollout import RolloutPool
    from home_rl.trainer.rollout_side import export_think_view

    start = time.perf_counter()
    view = export_think_view(home_dir, Path(cfg.output_dir))
    pool = RolloutPool(str(view), cfg.rollout)
    try:
        prompts = [{"prompt_token_ids": list(range(10, 10 + cfg.data.max_prompt_tokens))} for _ in range(4)]
        try:
            pool.generate(prompts, n=cfg.rollout.n, seed=0)
        except Exception as e:  # noqa: BLE001  the peak after start-up is still worth reporting
            print(f"generate failed: {e}")
        status = [_status(w) for w in pool.workers]
    finally:
        pool.shutdown()
    return {"measured_gib": round(max(s["VmHWM"] for s in status), 3), "seconds": round(time.perf_counter() - start, 1)}


class _Bare:
    """An actor that imports what a learner imports and nothing more: the process baseline."""

    def load(self) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import verl.trainer.ppo.core_algos  # noqa: F401


def measure_baseline() -> dict:
    import ray

    actor = ray.remote(_Bare).options(num_cpus=0).remote()
    ray.get(actor.load.remote())
    status = _status(actor)
    ray.kill(actor)
    return {"measured_gib": round(status["VmHWM"], 3)}


def predicted(cfg, role: str):
    from home_rl.memory_plan import plan_for_config

    plan = plan_for_config(cfg)  # this machine, as the recipe plans it
    actor = next(a for a in plan.actors if a.role == role)
    actor.stage = plan.zero_stage
    return actor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=None, help="run only these cases (names as in the output)")
    ap.add_argument("--measured", default="", help="an earlier run's output: predict its measurements again, start nothing")
    args = ap.parse_args()

    from home_rl.grpo import GRPOLoss
    from home_rl.model.embedded import resolve_model_path
    from home_rl.trainer.cold_start import ensure_cold_start
    from home_rl.trainer.startup import ensure_ray

    home_dir = ensure_cold_start("smollm2")  # cached: nothing is built when it is there
    dense_dir = resolve_model_path("smollm2")
    # learner.zero_stage=auto: the stage the plan picks for this machine (as the recipe would), and ZeRO-3 forced
    cases = [(f"grpo_micro{m}", "grpo_think", [f"learner.micro_batch_size={m}"]) for m in (2, 4, 8)]
    cases += [(f"grpo_micro{m}_zero3", "grpo_think", [f"learner.micro_batch_size={m}", "learner.zero_stage=3"])
              for m in (2, 8)]
    cases += [("grpo_micro4_checkpointing", "grpo_think", ["learner.micro_batch_size=4",
                                                           "learner.gradient_checkpointing=true"])]
    cases += [(f"grpo_budget{b}", "grpo_think", [f"learner.max_tokens_per_micro_batch={b}"]) for b in (512, 1024)]
    cases += [("rollout", "grpo_think", []), ("sft_cold_start", "sft", []), ("baseline", "none", [])]
    measured = {}
    if args.measured:  # re-predict an earlier run's measurements (constants changed since): nothing starts
        for line in Path(args.measured).read_text().splitlines():
            row = json.loads(line) if line.startswith("{\"case\"") else None
            if row and "measured_gib" in row:
                measured[row["case"]] = row
    else:
        ensure_ray(4)
    rows = []
    for name, recipe, overrides in cases:
        if (args.cases and name not in args.cases) or (args.measured and name not in measured):
            continue
        if name == "baseline":
            rows.append(measured.get(name) or {"case": name, **measure_baseline()})
            print(json.dumps(rows[-1]), flush=True)
            continue
        try:
            cfg = grpo_config(overrides) if recipe == "grpo_think" else sft_config(overrides)
        except Exception as e:  # noqa: BLE001  a knob this branch does not have yet (the token budget)
            rows.append({"case": name, "skipped": str(e)})
            continue
        role = "rollout" if name == "rollout" else "learner"
        if name in measured and "zero_stage" in measured[name]:
            cfg.learner.zero_stage = measured[name]["zero_stage"]  # the stage it was measured at
        actor = predicted(cfg, role)
        if cfg.learner.zero_stage == "auto":  # the plan's stage, as the recipe's start-up check records it
            cfg.learner.zero_stage = actor.stage
        if name in measured:
            got = {k: v for k, v in measured[name].items() if k not in ("case", "predicted_gib", "parts", "error")}
        elif role == "rollout":
            got = measure_rollout(cfg, home_dir)
        elif recipe == "sft":
            got = measure_learners(cfg, str(dense_dir), cfg.sft.max_response_tokens, "sft")
        else:
            got = measure_learners(cfg, str(home_dir), cfg.rollout.max_response_tokens, GRPOLoss(cfg.algorithm))
        row = {"case": name, **({"zero_stage": cfg.learner.zero_stage} if role == "learner" else {}), **got}
        row.update(predicted_gib=round(actor.predicted_gib, 3), parts={k: round(v, 3) for k, v in actor.parts.items()},
                   error=round(actor.predicted_gib / got["measured_gib"] - 1, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    within = [abs(r["error"]) <= 0.25 for r in rows if "error" in r]
    print(json.dumps({"cases": rows, "all_within_25pct": all(within) if within else None,
                      "measured_in": args.measured or "this run", "load_avg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
