"""The embedded default's cold start: SmolLM2-135M-Instruct learns both output templates, then is upcycled.

SmolLM2-135M-Instruct writes no well-formed answer from a system prompt alone, so GRPO would get
no signal. A short SFT on synthetic rows teaches both templates, each on the rows it suits (every
row names its template in `extra_info.expert`, `sft.route=row`): the think template on multi-step
word problems (1-6 steps, with worked steps), single-step arithmetic and copy/extract questions,
the fast template on what a direct answer suits: single-step arithmetic ("What is 7 + 5?") and
extract questions. Direct answers to six-step problems would only teach the fast template to guess
(a first recipe that trained both templates on every row left the fast view at 1% on one-step
word problems). The SFT'd dense model is upcycled into a HOME checkpoint, cached under
`cache_dir()/models/<name>-home`; later runs reuse it. This is where the default GRPO run starts.

    python -m home_rl.trainer.cold_start            # build (once) and evaluate; prints one JSON object
    python -m home_rl.trainer.cold_start --force    # rebuild
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from home_rl.experts import FAST, THINK
from home_rl.model.embedded import cache_dir

log = logging.getLogger(__name__)

RATIO = {"math": 0.5, "arith": 0.25, "extract": 0.25}  # the held-out mix: text families (the embedded model reads no images)
# Training sequences per (template, family, math levels); 528 in all, 16 per step: 33 steps (more
# updates beat bigger batches here), in micro-batches of 4 sorted by length (little padding). The
# fast template gets the most arithmetic: a direct sum must be recalled, the worked one is written out.
TRAIN_PLAN = ((THINK, "math", (1, 2, 3, 4, 5, 6), 192), (THINK, "arith", None, 48), (THINK, "extract", None, 48),
              (FAST, "arith", None, 160), (FAST, "extract", None, 80))
ROWS_PER_STEP = 16
TRAIN_SEED, HELDOUT_SEED = 0, 1


def cold_start_dir(name: str = "smollm2") -> Path:
    return cache_dir() / "models" / f"{name}-home"


def cold_start_config(name: str, data_path: Path, output_dir: Path):
    """The SFT config of the cold start (bf16, 16 sequences per step, one learner using both cores)."""
    from data_pipelines import DataConfig
    from home_rl.config import ModelConfig
    from home_rl.learner.config import LearnerConfig
    from home_rl.resources import Resources
    from home_rl.trainer.config import TrainerConfig
    from home_rl.trainer.sft import SFTConfig, SFTOptions

    return SFTConfig(
        model=ModelConfig(path=name, dtype="bfloat16"),
        data=DataConfig(path=str(data_path), prompts_per_step=ROWS_PER_STEP, seed=TRAIN_SEED),
        learner=LearnerConfig(num_learners=1, resources=Resources(cpus=1, threads=os.cpu_count() or 1),
                              lr=1e-4, warmup_steps=3, lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
                              micro_batch_size=4),
        trainer=TrainerConfig(total_steps=sum(n for *_, n in TRAIN_PLAN) // ROWS_PER_STEP, save_every=8, log_every=4),
        sft=SFTOptions(route="row"),
        output_dir=str(output_dir))


def cold_start_recipe(name: str) -> dict:
    """Everything that decides the cold start's result: a cached build made with another recipe is rebuilt."""
    from home_rl.config import to_dict

    sft = to_dict(cold_start_config(name, Path("DATA"), Path("OUT")))
    for key in ("resources", "micro_batch_size", "zero_stage"):  # where and how fast, not what (auto picks the stage)
        sft["learner"].pop(key)
    for key in ("log_every", "console", "tensorboard"):  # what is shown, not what is trained
        sft["trainer"].pop(key)
    rows = hashlib.sha256(json.dumps(train_rows()).encode()).hexdigest()  # a change of the generators rebuilds too
    recipe = {"plan": TRAIN_PLAN, "seed": TRAIN_SEED, "rows_sha256": rows, "sft": sft}
    return json.loads(json.dumps(recipe))  # as the stamp file reads back (tuples become lists)


def _same_recipe(stamped: Optional[dict], recipe: dict) -> bool:
    """Whether a cached build was made with `recipe`: every setting both name is equal.

    A key only one side names is a config knob added or removed since the stamp was written (data.answer_key,
    learner.node_resource before it moved into learner.resources): the build above sets none of them, so it
    ran with their defaults either way, and a new knob must not rebuild everyone's cache.
    """
    if isinstance(stamped, dict) and isinstance(recipe, dict):
        return all(_same_recipe(stamped[k], recipe[k]) for k in stamped.keys() & recipe.keys())
    return stamped == recipe


def train_rows() -> list[dict]:
    """The SFT rows of TRAIN_PLAN, shuffled; each names its template in extra_info.expert.

    Rows of a family that serves both templates are the same problems (the think rows are the first
    of the fast ones): a row's template is its label, not its content.
    """
    import random

    from data_pipelines.synthetic import make_rows

    rows = []
    for expert, family, levels, n in TRAIN_PLAN:
        drawn, _ = make_rows(family, n, seed=TRAIN_SEED, levels=levels)
        rows += [{**r, "id": f"{r['id']}-{expert}", "extra_info": {**r["extra_info"], "expert": expert}} for r in drawn]
    random.Random(TRAIN_SEED).shuffle(rows)
    return rows


def ensure_cold_start(name: str = "smollm2", force: bool = False, lora: Optional[Any] = None) -> Path:
    """The cached cold-start HOME checkpoint of embedded model `name`, built first if it is not there; with `lora`
    (a LoraSpec), its LoRA twin (`lora_cold_start`).

    A build killed midway resumes from its last SFT checkpoint on the next call.
    """
    if lora is not None:
        return lora_cold_start(ensure_cold_start(name, force), lora)
    from home_rl.console import phase_done
    from home_rl.model import DTYPES, upcycle
    from home_rl.trainer.sft import run_sft

    checked = time.perf_counter()
    out = cold_start_dir(name)
    stamp = out.with_name(out.name + ".json")  # the recipe and timings of the cached build
    recipe = cold_start_recipe(name)
    if not force and (out / "config.json").is_file() and stamp.is_file():
        if _same_recipe(json.loads(stamp.read_text()).get("recipe"), recipe):
            phase_done("cold start", "cached", checked)
            return out
        log.info("the cached cold start %s was built with another recipe: rebuilding", out)
    work = cache_dir() / "cold_start" / name
    if force or not (work / "recipe.json").is_file() or not _same_recipe(json.loads((work / "recipe.json").read_text()), recipe):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(recipe))
    start = time.perf_counter()
    data = work / "data" / "data.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(row) + "\n" for row in train_rows()))
    dense = run_sft(cold_start_config(name, data, work / "sft"))
    sft_s = time.perf_counter() - start
    home = upcycle(dense, DTYPES["bfloat16"])
    home.save_pretrained(out)  # written to a temporary folder and renamed: a half-written cache is never used
    stamp.write_text(json.dumps({"recipe": recipe, "sft_s": round(sft_s, 1),
                                 "total_s": round(time.perf_counter() - start, 1)}))
    phase_done("cold start", f"built {out}", checked)
    return out


def lora_cold_start(full: Path, lora: Any) -> Path:
    """The cold start with a LoRA think expert: the same SFT'd model upcycled with a think adapter at zero (after
    the cold start think = fast either way), cached beside it per adapter shape; the router's initial weights
    are the full cold start's."""
    import torch

    from home_rl.model import HomeModel, upcycle

    shape = f"r{lora.rank}-a{lora.alpha:g}-d{lora.dropout:g}-{'+'.join(lora.targets)}"
    out = full.with_name(f"{full.name}-lora-{shape}")
    # the full cold start it was made from (rebuilt with it); beside the folder, as the full one's stamp: a file
    # inside would travel into every checkpoint made from it
    made_from = out.with_name(out.name + ".json")
    stamp = json.dumps({"full": str(full), "built": full.with_name(full.name + ".json").read_text()})
    if made_from.is_file() and made_from.read_text() == stamp:
        return out
    full_home = HomeModel.from_pretrained(full)
    dense = out.with_name(out.name + ".dense")
    full_home.export_view(FAST, dense)
    torch.manual_seed(TRAIN_SEED)  # the adapter's A matrices
    home = upcycle(dense, "auto", full_home.home_config["router_layer"], full_home.home_config["router_pooling"],
                   full_home.home_config["router_hidden_size"], lora)
    home.router.load_state_dict(full_home.router.state_dict())
    home.save_pretrained(out)  # renamed into place: a half-written one is never used
    made_from.write_text(stamp)
    shutil.rmtree(dense)
    return out


# ----------------------------------------------------------------------------- evaluation


def heldout_rows(n: int) -> list[dict]:
    """`n` synthetic rows of the held-out mix whose prompts are not among the training rows."""
    from data_pipelines.synthetic import make_rows

    seen = {r["prompt"] for r in train_rows()}
    rows, _ = make_rows("mix", 4 * n, seed=HELDOUT_SEED, ratio=RATIO)
    return [r for r in rows if r["prompt"] not in seen][:n]


def evaluate_templates(home_dir: Path, rows: list[dict], temperature: float = 1.0, max_tokens: int = 256,
                       seed: int = 0) -> dict:
    """Sample each row once per template from the think view; well-formed rate and accuracy per template."""
    import tempfile

    from data_pipelines import DataConfig, render_prompt
    from home_rl.trainer.startup import load_processor
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
        for expert in (THINK, FAST):
            prompts = [render_prompt(r, expert, processor, DataConfig()) for r in rows]
            result = worker.generate(prompts, seed=seed)
            per_family: dict = defaultdict(lambda: {"n": 0, "well_formed": 0, "correct": 0})
            tokens = 0
            for row, (sample,) in zip(rows, result.samples):
                source = row["data_source"]
                well_formed = fmt(sample.text, None, data_source=source, extra_info={"expert": expert})["score"]
                check = get_verifier(default_sources()[source][0].name)
                correct = check(sample.text, row["answer"], data_source=source, extra_info=row["extra_info"])["score"]
                groups = ["all", source] + ([f"math@{row['extra_info'].get('steps', 1)}"] if source == "math" else [])
                for key in groups:  # overall, per family, and math per number of steps
                    per_family[key]["n"] += 1
                    per_family[key]["well_formed"] += well_formed
                    per_family[key]["correct"] += correct
                tokens += len(sample.response_ids)
            n, overall = len(rows), per_family.pop("all")
            report[expert] = {
                "well_formed": overall["well_formed"] / n,
                "accuracy": overall["correct"] / n,
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
        rows = heldout_rows(args.heldout)
        out["eval"] = {"prompts": len(rows), "temperature": 1.0, **evaluate_templates(home, rows)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
