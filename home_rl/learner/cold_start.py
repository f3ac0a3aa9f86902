"""The embedded default's cold start: SmolLM2-135M-Instruct learns both output templates, then is upcycled.

SmolLM2-135M-Instruct writes no well-formed answer from a system prompt alone, so GRPO would get
no signal. A short SFT on the synthetic mix teaches both templates on every row (`sft.route=both`):
multi-step arithmetic with its worked steps (think) or a direct answer (fast), and copy/extract
questions likewise. The SFT'd dense model is upcycled into a HOME checkpoint, cached under
`cache_dir()/models/<name>-home`; later runs reuse it. This is where the default GRPO run starts.

    python -m home_rl.learner.cold_start            # build (once) and evaluate; prints one JSON object
    python -m home_rl.learner.cold_start --force    # rebuild
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from home_rl.model.embedded import cache_dir

log = logging.getLogger(__name__)

RATIO = {"math": 0.5, "extract": 0.5}  # text families: the embedded model reads no images
TRAIN_ROWS = 192  # x2 sequences (both templates): 384 sequences
ROWS_PER_STEP = 8  # 16 sequences: one micro-batch per step, 24 steps (more updates beat bigger batches here)
TRAIN_SEED, HELDOUT_SEED = 0, 1


def cold_start_dir(name: str = "smollm2") -> Path:
    return cache_dir() / "models" / f"{name}-home"


def cold_start_config(name: str, data_path: Path, output_dir: Path):
    """The SFT config of the cold start (bf16, micro-batches of 16, one learner using both cores)."""
    from data_pipelines import DataConfig
    from home_rl.config import ModelConfig
    from home_rl.learner.config import LearnerConfig
    from home_rl.learner.sft import SFTConfig, SFTOptions, TrainerConfig

    return SFTConfig(
        model=ModelConfig(path=name, dtype="bfloat16"),
        data=DataConfig(path=str(data_path), prompts_per_step=ROWS_PER_STEP, seed=TRAIN_SEED),
        learner=LearnerConfig(num_learners=1, cpus_per_learner=1, threads_per_learner=os.cpu_count() or 1,
                              lr=1e-4, warmup_steps=3, lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
                              micro_batch_size=16),
        trainer=TrainerConfig(total_steps=TRAIN_ROWS // ROWS_PER_STEP, save_every=8, log_every=1),
        sft=SFTOptions(route="both"),
        output_dir=str(output_dir))


def cold_start_recipe(name: str) -> dict:
    """Everything that decides the cold start's result: a cached build made with another recipe is rebuilt."""
    from home_rl.config import to_dict

    sft = to_dict(cold_start_config(name, Path("DATA"), Path("OUT")))
    for key in ("threads_per_learner", "cpus_per_learner"):  # how fast, not what: they follow the machine
        sft["learner"].pop(key)
    return {"rows": TRAIN_ROWS, "ratio": RATIO, "seed": TRAIN_SEED, "sft": sft}


def ensure_cold_start(name: str = "smollm2", force: bool = False) -> Path:
    """The cached cold-start HOME checkpoint of embedded model `name`, built first if it is not there.

    A build killed midway resumes from its last SFT checkpoint on the next call.
    """
    from data_pipelines.synthetic import generate
    from home_rl.learner.sft import run_sft
    from home_rl.model import DTYPES, upcycle

    out = cold_start_dir(name)
    stamp = out.with_name(out.name + ".json")  # the recipe and timings of the cached build
    recipe = cold_start_recipe(name)
    if not force and (out / "config.json").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()).get("recipe") == recipe:
            return out
        log.info("the cached cold start %s was built with another recipe: rebuilding", out)
    work = cache_dir() / "cold_start" / name
    if force or not (work / "recipe.json").is_file() or json.loads((work / "recipe.json").read_text()) != recipe:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(recipe))
    start = time.perf_counter()
    data = generate("mix", TRAIN_ROWS, seed=TRAIN_SEED, out=work / "data", ratio=RATIO)
    dense = run_sft(cold_start_config(name, data, work / "sft"))
    sft_s = time.perf_counter() - start
    home = upcycle(dense, DTYPES["bfloat16"])
    home.save_pretrained(out)  # written to a temporary folder and renamed: a half-written cache is never used
    stamp.write_text(json.dumps({"recipe": recipe, "sft_s": round(sft_s, 1),
                                 "total_s": round(time.perf_counter() - start, 1)}))
    log.info("cold start of %s: %s (%.0f s)", name, out, time.perf_counter() - start)
    return out


# ----------------------------------------------------------------------------- evaluation


def heldout_rows(n: int, train_path: Optional[Path] = None) -> list[dict]:
    """`n` synthetic rows of the cold-start mix whose prompts are not among the training rows."""
    from data_pipelines import read_rows
    from data_pipelines.synthetic import make_rows

    seen = {r["prompt"] for r in read_rows(train_path)} if train_path else set()
    rows, _ = make_rows("mix", 4 * n, seed=HELDOUT_SEED, ratio=RATIO)
    return [r for r in rows if r["prompt"] not in seen][:n]


def evaluate_templates(home_dir: Path, rows: list[dict], temperature: float = 1.0, max_tokens: int = 256,
                       seed: int = 0) -> dict:
    """Sample each row once per template from the think view; well-formed rate and accuracy per template."""
    import tempfile

    from data_pipelines import DataConfig, render_prompt
    from home_rl.learner.sft import load_processor
    from home_rl.model import HomeModel
    from home_rl.rollout import RolloutConfig, RolloutWorker
    from reward import get_verifier
    from reward.config import default_sources

    view = Path(tempfile.mkdtemp()) / "think_view"
    HomeModel.from_pretrained(home_dir).export_view("think", view)  # right after upcycling both views are equal
    processor = load_processor(view)
    worker = RolloutWorker(str(view), RolloutConfig(n=1, temperature=temperature, max_response_tokens=max_tokens,
                                                    kv_cache_gib=1.0, seed=seed))
    fmt = get_verifier("format")
    report: dict = {}
    try:
        for expert in ("think", "fast"):
            prompts = [render_prompt(r, expert, processor, DataConfig()) for r in rows]
            result = worker.generate(prompts, seed=seed)
            per_family: dict = defaultdict(lambda: {"n": 0, "well_formed": 0, "correct": 0})
            tokens = 0
            for row, (sample,) in zip(rows, result.samples):
                family = per_family[row["data_source"]]
                family["n"] += 1
                family["well_formed"] += fmt(sample.text, None, data_source=row["data_source"],
                                             extra_info={"expert": expert})["score"]
                check = get_verifier(default_sources()[row["data_source"]][0].name)
                family["correct"] += check(sample.text, row["answer"], data_source=row["data_source"],
                                           extra_info=row["extra_info"])["score"]
                tokens += len(sample.response_ids)
            n = len(rows)
            report[expert] = {
                "well_formed": sum(f["well_formed"] for f in per_family.values()) / n,
                "accuracy": sum(f["correct"] for f in per_family.values()) / n,
                "mean_response_tokens": tokens / n,
                "generate_s": round(result.stats["seconds"], 1),
                "per_family": {k: {"n": v["n"], "well_formed": v["well_formed"] / v["n"],
                                   "accuracy": v["correct"] / v["n"]} for k, v in sorted(per_family.items())},
                "example": result.samples[0][0].text,
            }
    finally:
        worker.shutdown()
        shutil.rmtree(view.parent, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="Build (once) and evaluate the embedded model's cold start.")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache holds it")
    ap.add_argument("--heldout", type=int, default=200, help="held-out prompts, sampled once per template")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    home = ensure_cold_start(args.name, force=args.force)
    out: dict = {"home_checkpoint": str(home), "build_or_load_s": round(time.perf_counter() - start, 1)}
    work = cache_dir() / "cold_start" / args.name
    stamp = home.with_name(home.name + ".json")
    if stamp.is_file():
        out["build"] = {k: v for k, v in json.loads(stamp.read_text()).items() if k != "recipe"}
    metrics = work / "sft" / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        out["sft"] = {"steps": len(lines), "first_loss": lines[0]["loss"], "last_loss": lines[-1]["loss"],
                      "mean_step_s": sum(m["step_s"] for m in lines) / len(lines),
                      "mean_tokens_per_s": sum(m["tokens_per_s"] for m in lines) / len(lines)}
    if not args.no_eval:
        rows = heldout_rows(args.heldout, work / "data" / "data.jsonl")
        out["eval"] = {"prompts": len(rows), "temperature": 1.0, **evaluate_templates(home, rows)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
