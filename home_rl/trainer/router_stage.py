"""The router stage's driver: label prompts from rollouts of both experts, fit the router, save the HOME checkpoint.

    rows -> fast view and think view answer each prompt n times (vLLM) -> scores (reward pool)
         -> per prompt: accuracy and mean length per expert -> label (labels.jsonl)
         -> router features of the fast view (HomeModelActor) -> CE fit (router.target: the
            expected net gain as a soft target, or the 0/1 labels)
         -> output_dir/final: the HOME checkpoint with only the router changed
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from home_rl.config import save_config
from home_rl.errors import HomeRLError
from home_rl.experts import FAST, THINK, row_type
from home_rl.router.config import RouterStageConfig
from home_rl.router.labels import (EXPERT_INDEX, LABEL_NUMBERS, has_numbers, class_counts, has_gain, label_record,
                                   net_gains, read_labels, relabel, write_labels)
from home_rl.router.features import router_inputs
from home_rl.router.trainer import EmptyLabelSetError
from home_rl.trainer.router_data import load_rows
from home_rl.trainer.both_views import ViewsRun
from home_rl.trainer.startup import load_processor, resolve_home_checkpoint

log = logging.getLogger(__name__)


def train_router(cfg: RouterStageConfig) -> Path:
    """Run the router stage; returns output_dir/final."""
    import ray

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    checkpoint = resolve_home_checkpoint(cfg.checkpoint, "checkpoint", "recipes/grpo_think.py")
    given = None
    if cfg.labels_path:  # read before anything heavy starts: an empty or broken file fails at once
        given = [relabel(r, cfg.labels.margin, cfg.labels.length_cost) for r in read_labels(cfg.labels_path)]
        if not given:
            raise EmptyLabelSetError(f"the labelled set {cfg.labels_path} is empty: there is no prompt to train the router on")
        bare = next((r["id"] for r in given if not has_gain(r)), None)
        if cfg.router.target == "expected_gain" and bare is not None:
            raise HomeRLError(f"labels_path {cfg.labels_path}: record {bare!r} has no gain and threshold, which "
                              "router.target=expected_gain fits: give router.target=label to fit the labels alone")
    processor = load_processor(checkpoint)
    rows = load_rows(cfg.data, cfg.synthetic, out / "data", processor)
    save_config(cfg, out)

    rollout = cfg.rollout if given is None else None  # given labels: no view answers
    with ViewsRun(checkpoint, rollout, cfg.reward, cfg.actor.resources, out / "views",
                  plan_cfg=cfg) as run:
        home = run.home
        info = ray.get(home.info.remote())
        if given is None:
            both = run.answer(rows, processor, cfg.data, cfg.seed)
            records = [label_record(row, think, fast, cfg.rollout.max_response_tokens, cfg.labels.margin,
                                    cfg.labels.length_cost, row_type(row, cfg.think_sources))
                       for row, think, fast in zip(both.rows, both.stats[THINK], both.stats[FAST])]
            labelled_rows = both.rows
            timing = both.timing
        else:
            records, labelled_rows = _join(given, rows, cfg.labels_path)
            timing = {}
        write_labels(out / "labels.jsonl", records)
        counts = class_counts(r["label"] for r in records)
        log.info("labels: %d prompts, %d think / %d fast (written to %s)", len(records), counts["think"],
                 counts["fast"], out / "labels.jsonl")

        t0 = time.perf_counter()
        candidates = cfg.candidates(info["num_layers"], (info["router_layer"], info["router_pooling"]))
        by_candidate = run.features(router_inputs(labelled_rows, cfg.actor.template, processor, cfg.data),
                                    cfg.actor.feature_batch_size, candidates=candidates)
        timing["features_s"] = time.perf_counter() - t0
        labels, gains, kinds = [EXPERT_INDEX[r["label"]] for r in records], net_gains(records), prompt_kinds(records)
        fits = {c: ray.get(home.fit.remote(by_candidate[c], labels, cfg.router, gains, kinds)) for c in candidates}
        reads, selection = select_input(fits)
        fit, features = fits[reads], by_candidate[reads]
        _log_history(out, fit.history, cfg.tensorboard)
        note = {"labels": "rollouts" if given is None else f"file {cfg.labels_path}", "prompts": len(records),
                "class_counts": counts, "margin": cfg.labels.margin, "length_cost": cfg.labels.length_cost,
                "max_response_tokens": cfg.rollout.max_response_tokens, "template": cfg.actor.template,
                "target": cfg.router.target, "layer": reads[0], "pooling": reads[1],
                "val_acc": fit.metrics.get("val/acc"), "best_epoch": fit.metrics["best_epoch"]}
        point = calibrated_point(ray.get(home.route_logits.remote(features, fit.state)), records, fit.val_index,
                                 cfg.router.budget)
        ray.get(home.install_router.remote(fit.state, note, point, reads))
        final = Path(ray.get(home.save.remote(str(out / "final"))))
        summary = {"checkpoint": str(checkpoint), "final": str(final), "router": info, "fit": fit.metrics,
                   "operating_point": point, "input_selection": selection,
                   "labels": {"prompts": len(records), **counts,
                              "by_source": _label_breakdown(records)},
                   "timing": {**timing, "total_s": time.perf_counter() - start}}
        (out / "router_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("router (%s): val acc %s, net gain %s (labels %s), predicted think ratio %.2f (labels %.2f); "
                 "saved %s", cfg.router.target, _fmt(fit.metrics.get("val/acc")), _fmt(fit.metrics.get("net_gain")),
                 _fmt(fit.metrics.get("label_net_gain")), fit.metrics["predicted_think_ratio"],
                 fit.metrics["label_think_ratio"], final)
        if point is not None:
            m = point["measured"]
            log.info("operating point (%s, on %d %s prompts): threshold %.3f, accuracy %.3f (always-think %.3f), "
                     "tokens %.2fx always-think's, thinking ratio %.2f", point["budget"] or "argmax", point["prompts"],
                     point["split"], point["threshold"], m["accuracy"], point["always_think"]["accuracy"],
                     m["token_ratio"], m["think_ratio"])
        return final


def select_input(fits: dict) -> tuple[tuple[int, str], list[dict]]:
    """The (layer, pooling) whose router fits best: the lowest validation loss (training loss when the split held
    nothing out; a tie keeps the first, the checkpoint's own); and each candidate's numbers, for the report."""
    table = [{"layer": layer, "pooling": how, "val_loss": f.metrics.get("val/loss"), "train_loss": f.metrics["train/loss"],
              "val_net_gain": f.metrics.get("val/net_gain"), "best_epoch": f.metrics["best_epoch"]}
             for (layer, how), f in fits.items()]
    key = "val_loss" if all(row["val_loss"] is not None for row in table) else "train_loss"
    best = min(range(len(table)), key=lambda i: table[i][key])
    log.info("router input: layer %d, %s pooling (validation loss %s; of %s)", table[best]["layer"],
             table[best]["pooling"], _fmt(table[best]["val_loss"]),
             ", ".join(f"{r['layer']}/{r['pooling']} {_fmt(r[key])}" for r in table))
    return list(fits)[best], table


def calibrated_point(logits, records: list[dict], val_index: list[int], budget: str) -> Optional[dict]:
    """The operating point (home_rl/router/operating_point.py) on the validation prompts (all of them when the
    split held none out), from each record's accuracies and lengths per expert; None for labels without them."""
    from home_rl.router.operating_point import Outcome, operating_point, parse_budget, think_probabilities

    if not all(has_numbers(r, LABEL_NUMBERS) for r in records):
        if budget:
            raise HomeRLError(f"router.budget={budget}: the labels carry no accuracy and length per expert to "
                              "calibrate a threshold on (labels made elsewhere): give router.budget= (the argmax)")
        return None
    index = val_index or list(range(len(records)))
    p_think = think_probabilities(logits)
    outcomes = [Outcome(records[i]["acc_think"], records[i]["acc_fast"], records[i]["len_think"], records[i]["len_fast"])
                for i in index]
    point = operating_point([p_think[i] for i in index], outcomes, parse_budget(budget))
    return {**point, "split": "validation" if val_index else "all"}


def _join(records: list[dict], rows: list[dict], path: str) -> tuple[list[dict], list[dict]]:
    """The given label records with their data rows (same order); ids missing from the data are an error."""
    by_id = {r["id"]: r for r in rows}
    missing = [r["id"] for r in records if r["id"] not in by_id]
    if missing:
        raise HomeRLError(f"labels_path {path}: {len(missing)} id(s) are not rows of the data, e.g. {missing[:3]} "
                          "(give the data.path the labels were made from)")
    return records, [by_id[r["id"]] for r in records]


def prompt_kinds(records: list[dict]) -> list[str]:
    """Each record's kind, "<data_source>@<steps>": what the router's validation split is stratified by."""
    return [f"{r.get('data_source')}@{r.get('steps')}" for r in records]


def _label_breakdown(records: list[dict]) -> dict:
    """Per data_source (and per step count where there are several): prompts and share labelled think."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(str(r.get("data_source")), []).append(r["label"])
        if r.get("steps") is not None:
            groups.setdefault(f"{r.get('data_source')}@steps={r['steps']}", []).append(r["label"])
    return {k: {"prompts": len(v), "think_ratio": sum(x == "think" for x in v) / len(v)} for k, v in sorted(groups.items())}


def _log_history(out: Path, history: list[dict], tensorboard: bool) -> None:
    from home_rl.tracking import MetricsLogger

    logger = MetricsLogger(out, tensorboard=tensorboard)
    try:
        for entry in history:
            logger.log(entry["epoch"], {k: v for k, v in entry.items() if k != "epoch"})
    finally:
        logger.close()


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
