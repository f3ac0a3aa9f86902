"""What the router should fit: the expected net gain (soft targets) or the 0/1 labels, side by side over seeds.

    python benchmarks/router_targets.py [--router outputs/router] [--evaluate outputs/evaluate] [--seeds 6]
                                        [--margin M --length-cost C]   # relabel with other knobs first
                                        [--set weight_decay=0.3 ...]   # other router fit settings

Reads a router stage's output (labels.jsonl, data/, final/) and an evaluation's (samples.jsonl,
data/), both run with their defaults. The router features of both prompt sets are computed once
with the stage's checkpoint; then for each target and seed a router is fitted on the stage's
labels (router defaults otherwise), routes the evaluation prompts, and is scored on the
evaluation's own samples (both experts answered every prompt there, so every router is scored on
the same answers). Prints one JSON object: per target and seed, accuracy, thinking ratio and mean
tokens of the overall, per-source and per-step groups, always-think and always-fast beside them,
and how many seeds meet the router stage's bars (hybrid accuracy within 1 point of the better
single expert with fewer tokens than always-think; thinking ratio >= 70% on math of 3+ steps,
<= 30% on arith and extract).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

from data_pipelines import DataConfig, load_dataset
from home_rl.experts import THINK
from home_rl.router.config import RouterTrainConfig
from home_rl.router.features import router_inputs
from home_rl.router.labels import ExpertStats, net_gains, read_labels, relabel
from home_rl.router.actor import HomeModelActor
from home_rl.router.trainer import fit_router
from home_rl.trainer.evaluate import ALL, group_keys, summarize_policy
from home_rl.trainer.router_stage import prompt_kinds
from home_rl.trainer.startup import load_processor

TARGETS = ("expected_gain", "label")


def rows_of(path: Path, processor: Any) -> list[dict]:
    data = DataConfig()
    data.path = str(path)
    return load_dataset(data, processor).rows


def meets_bars(hybrid: dict, think: dict, fast: dict) -> bool:
    """The router stage's bars (groups the data lacks pass)."""
    def ratio(group: str, missing: float) -> float:
        return hybrid.get(group, {"think_ratio": missing})["think_ratio"]

    return all([hybrid[ALL]["accuracy"] >= max(think[ALL]["accuracy"], fast[ALL]["accuracy"]) - 0.01,
                hybrid[ALL]["mean_tokens"] < think[ALL]["mean_tokens"],
                ratio("math@steps>=3", 1.0) >= 0.7, ratio("arith", 0.0) <= 0.3, ratio("extract", 0.0) <= 0.3])


def fit_settings(pairs: list[str]) -> dict:
    """['weight_decay=0.3', 'lr=1e-2'] -> RouterTrainConfig keyword arguments, each of its field's type."""
    types = {f.name: type(f.default) for f in dataclasses.fields(RouterTrainConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or key in ("target", "seed"):
            raise SystemExit(f"--set {pair}: not a RouterTrainConfig field this benchmark lets vary")
        out[key] = types[key](value)
    return out


def main(router_dir: Path, eval_dir: Path, seeds: int, knobs: Optional[tuple[float, float]] = None,
         settings: Optional[dict] = None) -> dict:
    checkpoint = router_dir / "final"
    processor = load_processor(checkpoint)
    trainer = HomeModelActor(str(checkpoint), threads=2)
    records = read_labels(router_dir / "labels.jsonl")
    if knobs is not None:
        records = [relabel(r, *knobs) for r in records]
    train_rows = {r["id"]: r for r in rows_of(router_dir / "data" / "data.jsonl", processor)}
    train_rows = [train_rows[r["id"]] for r in records]
    samples = {s["id"]: s for s in map(json.loads, (eval_dir / "samples.jsonl").read_text().splitlines())}
    eval_rows = [r for r in rows_of(eval_dir / "data" / "data.jsonl", processor) if r["id"] in samples]

    template = trainer.home.home_config.get("router_trained", {}).get("template", "fast")
    x_train = trainer.features(router_inputs(train_rows, template, processor, DataConfig()))
    x_eval = trainer.features(router_inputs(eval_rows, template, processor, DataConfig()))
    labels = [int(r["label"] == THINK) for r in records]
    gains = net_gains(records)
    # Each expert's answers to an evaluation prompt, as the evaluation scored them.
    think = [ExpertStats([samples[r["id"]]["acc_think"]], [samples[r["id"]]["len_think"]]) for r in eval_rows]
    fast = [ExpertStats([samples[r["id"]]["acc_fast"]], [samples[r["id"]]["len_fast"]]) for r in eval_rows]
    groups = group_keys(eval_rows)
    always_think = summarize_policy(groups, think, fast, [THINK] * len(eval_rows))
    always_fast = summarize_policy(groups, think, fast, ["fast"] * len(eval_rows))

    out = {"router_dir": str(router_dir), "eval_dir": str(eval_dir), "train_prompts": len(records),
           "margin": records[0].get("margin"), "length_cost": records[0].get("length_cost"), "settings": settings or {},
           "eval_prompts": len(eval_rows), "always_think": always_think, "always_fast": always_fast}
    for target in TARGETS:
        runs = []
        for seed in range(seeds):
            fit = fit_router(x_train, labels, RouterTrainConfig(target=target, seed=seed, **(settings or {})),
                             trainer.home.home_config["router_hidden_size"], net_gains=gains,
                             strata=prompt_kinds(records))
            choices = [("fast", THINK)[int(i)] for i in trainer.route_logits(x_eval, fit.state).argmax(1)]
            hybrid = summarize_policy(groups, think, fast, choices)
            runs.append({"seed": seed, "best_epoch": fit.metrics["best_epoch"],
                         "meets_bars": meets_bars(hybrid, always_think, always_fast), "hybrid": hybrid})
        out[target] = {"seeds_meeting_bars": sum(r["meets_bars"] for r in runs), "seeds": seeds, "runs": runs}
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", type=Path, default=Path("outputs/router"), help="the router stage's output_dir")
    parser.add_argument("--evaluate", type=Path, default=Path("outputs/evaluate"), help="the evaluation's output_dir")
    parser.add_argument("--seeds", type=int, default=6, help="router seeds per target")
    parser.add_argument("--margin", type=float, help="relabel with this labels.margin (with --length-cost)")
    parser.add_argument("--length-cost", type=float, help="relabel with this labels.length_cost (with --margin)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="router fit settings (RouterTrainConfig)")
    args = parser.parse_args()
    if (args.margin is None) != (args.length_cost is None):
        parser.error("give --margin and --length-cost together")
    knobs = None if args.margin is None else (args.margin, args.length_cost)
    print(json.dumps(main(args.router, args.evaluate, args.seeds, knobs, fit_settings(args.set)), indent=1))
