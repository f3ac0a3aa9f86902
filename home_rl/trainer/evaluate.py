"""Hybrid evaluation: the router picks an expert per query and that expert's view answers.

Both views answer every evaluation prompt (vLLM rollout workers, one view after the other), so
every policy is scored on the same samples: a paired comparison with no extra sampling noise.

    hybrid        the checkpoint's router picks per prompt
    always_think  every prompt to the think expert
    always_fast   every prompt to the fast expert
    oracle        the label rule of the router stage applied to these very rollouts: hindsight (home_rl/router/oracle.py)
    type_labels   a router fitted on data-type labels (the paper's Stage-SFT labels: think for reasoning
                  sources), fitted by the same router trainer on a training set's features rather than by
                  a full Stage-SFT run (its router loss learns the same labels)

Each is reported per data_source (and per step count for sources with several) as accuracy,
thinking ratio, mean response tokens, the performance gap recovered and the token ratio to always-think, in
report.json, report.md and report.png. With `samples` > 0 both views also answer each prompt that many times
sampled; report.json's `sampled` scores the policies on those answers beside the hindsight oracle and the
cross-fitted one (chosen on half of a prompt's samples, scored on the other half). The trade-off of every
threshold, random routing and routing by groups: home_rl/trainer/pareto.py (`pareto`, `group_frontier`).
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from home_rl.config import save_config
from home_rl.router.config import DEFAULT_CHECKPOINT, EvaluateConfig
from home_rl.experts import EXPERT_INDEX, EXPERTS, FAST, THINK, row_type
from home_rl.router.features import router_inputs
from home_rl.router.labels import ExpertStats
from home_rl.router.operating_point import Outcome, think_probabilities, threshold_of
from home_rl.router.oracle import Chosen, chosen_by, cross_fitted, hindsight_choices
from home_rl.trainer.router_data import load_rows, synthetic_mix
from home_rl.trainer.both_views import SampledPass, ViewsRun
from home_rl.trainer.pareto import pareto_report, plot_pareto
from home_rl.trainer.startup import load_processor, resolve_home_checkpoint

log = logging.getLogger(__name__)

POLICIES = ("hybrid", "always_think", "always_fast", "oracle", "oracle_cross_fitted", "type_labels")
TITLES = {"hybrid": "hybrid (router)", "always_think": "always think", "always_fast": "always fast",
          "oracle": "oracle (hindsight)", "oracle_cross_fitted": "oracle (cross-fitted)",
          "type_labels": "type labels (paper)"}
ALL = "all"


# ----------------------------------------------------------------------------- pure report logic


def group_keys(rows: Sequence[dict], steps_at_least: int = 3) -> list[list[str]]:
    """The report groups each row counts in: all, its data_source, and for sources whose rows have several
    step counts (extra_info.steps) also "<source>@steps=K" and "<source>@steps>=N" (N = steps_at_least)."""
    def steps_of_row(row: dict) -> Optional[int]:
        steps = (row.get("extra_info") or {}).get("steps")
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else None

    steps_of = defaultdict(set)
    for row in rows:
        steps_of[row["data_source"]].add(steps_of_row(row))
    out = []
    for row in rows:
        source = row["data_source"]
        keys = [ALL, source]
        steps = steps_of_row(row)
        if steps is not None and len(steps_of[source]) > 1:
            keys.append(f"{source}@steps={steps}")
            if steps_at_least and steps >= steps_at_least:
                keys.append(f"{source}@steps>={steps_at_least}")
        out.append(keys)
    return out


def summarize_policy(groups: Sequence[list[str]], think: Sequence[ExpertStats], fast: Sequence[ExpertStats],
                     choices: Sequence[str]) -> dict[str, dict]:
    """Per group: accuracy and mean response tokens of the chosen expert's samples, and the share routed to think."""
    return summarize_chosen(groups, chosen_by(choices, think, fast))


def summarize_chosen(groups: Sequence[list[str]], chosen: Sequence[Chosen]) -> dict[str, dict]:
    """Per group: mean accuracy, mean tokens and thinking ratio of what each prompt's routing gave."""
    acc, tokens, thinks = defaultdict(list), defaultdict(list), defaultdict(list)
    for keys, c in zip(groups, chosen, strict=True):
        for key in keys:
            acc[key].append(c.accuracy)
            tokens[key].append(c.tokens)
            thinks[key].append(c.think)
    return {key: {"accuracy": _mean(acc[key]), "think_ratio": _mean(thinks[key]), "mean_tokens": _mean(tokens[key]),
                  "prompts": len(acc[key])} for key in _ordered(acc)}


def add_gap_recovered(table: dict[str, dict]) -> dict[str, dict]:
    """Each policy's performance gap recovered per group, (accuracy - always-fast) / (always-think - always-fast)
    (None where the two are equal), beside its token ratio to always-think."""
    think, fast = table["always_think"], table["always_fast"]
    for policy in table.values():
        for group, entry in policy.items():
            gap = think[group]["accuracy"] - fast[group]["accuracy"]
            entry["gap_recovered"] = (entry["accuracy"] - fast[group]["accuracy"]) / gap if abs(gap) > 1e-12 else None
            spent = think[group]["mean_tokens"]
            entry["token_ratio"] = entry["mean_tokens"] / spent if spent else None
    return table


def frontier_group(row: dict) -> str:
    """The group a row is routed with on the group frontier: its data source and step count (where it has one)."""
    steps = (row.get("extra_info") or {}).get("steps")
    return row["data_source"] if steps is None else f"{row['data_source']}@steps={steps}"


def markdown_report(report: dict) -> str:
    """A table per metric: one row per group, one column per policy; the same for the sampled answers."""
    lines = [f"# Hybrid evaluation: {report.get('info', {}).get('checkpoint', '')}", ""]
    lines += _tables(report, "")
    if "sampled" in report:
        lines += _tables(report["sampled"], " (sampled answers)")
    notes = report.get("info", {}).get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _tables(table: dict, suffix: str) -> list[str]:
    policies = [p for p in POLICIES if p in table]
    groups = list(table[policies[0]])
    lines = []
    for metric, title, fmt in (("accuracy", "Accuracy", "{:.1%}"), ("think_ratio", "Thinking ratio", "{:.1%}"),
                               ("mean_tokens", "Mean response tokens", "{:.1f}"),
                               ("gap_recovered", "Performance gap recovered", "{:.2f}")):
        if not all(metric in table[p][g] for p in policies for g in groups):
            continue
        lines += [f"## {title}{suffix}", "", "| group | prompts | " + " | ".join(TITLES[p] for p in policies) + " |",
                  "|---|---:|" + "---:|" * len(policies)]
        for g in groups:
            cells = ["n/a" if table[p][g][metric] is None else fmt.format(table[p][g][metric]) for p in policies]
            lines.append(f"| {g} | {table[policies[0]][g]['prompts']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot_report(report: dict, path: Path) -> Path:
    """Grouped bars: accuracy, thinking ratio and mean tokens per group, one bar per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [p for p in POLICIES if p in report]
    groups = list(report[policies[0]])
    width = 0.8 / len(policies)
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.9 * len(groups) * len(policies) / 2 + 3), 10), squeeze=False)
    for ax, (metric, title) in zip(axes[:, 0], (("accuracy", "accuracy"), ("think_ratio", "thinking ratio"),
                                                 ("mean_tokens", "mean response tokens"))):
        for k, p in enumerate(policies):
            xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, [report[p][g][metric] for g in groups], width, label=TITLES[p])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if metric != "mean_tokens":
            ax.set_ylim(0, 1.05)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(policies), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _ordered(groups) -> list[str]:
    """all first, then each source followed by its step groups (numerically)."""
    def key(g: str):
        if g == ALL:
            return ("", 0, 0)
        source, _, rest = g.partition("@steps")
        if not rest:
            return (source, 0, 0)
        at_least = rest.startswith(">=")
        return (source, 2 if at_least else 1, int(rest.lstrip(">=")))
    return sorted(groups, key=key)


# ----------------------------------------------------------------------------- the run


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run the evaluation; writes report.json, report.md, report.png and samples.jsonl; returns the report."""
    import ray

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    make_it = "recipes/train_router.py"
    if not (Path(DEFAULT_CHECKPOINT) / "config.json").is_file():
        make_it = "recipes/grpo_think.py and then recipes/train_router.py"
    checkpoint = resolve_home_checkpoint(cfg.checkpoint, "checkpoint", make_it)
    processor = load_processor(checkpoint)
    rows = load_rows(cfg.data, cfg.synthetic, out / "data", processor)
    type_rows = _type_rows(cfg, out, processor) if cfg.type_router.enabled else []
    save_config(cfg, out)

    notes = []
    with ViewsRun(checkpoint, cfg.rollout, cfg.reward, cfg.actor.resources, out / "views",
                  plan_cfg=cfg) as run:
        home = run.home
        info = ray.get(home.info.remote())
        if not info.get("router_trained"):
            msg = (f"the router of {checkpoint} was never trained by the router stage (recipes/train_router.py): "
                   "its choices say little")
            log.warning(msg)
            notes.append(msg)
        sampled = SampledPass(cfg.samples, cfg.sample_temperature) if cfg.samples else None
        both = run.answer(rows, processor, cfg.data, cfg.seed, sampled)
        rows = both.rows
        batch = cfg.actor.feature_batch_size
        features = run.features(router_inputs(rows, cfg.actor.template, processor, cfg.data), batch)
        p_think = think_probabilities(ray.get(home.route_logits.remote(features)))
        threshold = threshold_of({"router_operating_point": info.get("operating_point")})
        choices = {"hybrid": [THINK if p > threshold else FAST for p in p_think],
                   "always_think": [THINK] * len(rows), "always_fast": [FAST] * len(rows),
                   "oracle": hindsight_choices(both.stats[THINK], both.stats[FAST], cfg.rollout.max_response_tokens,
                                               cfg.labels.margin, cfg.labels.length_cost)}
        type_fit = None
        if type_rows:
            type_features = run.features(router_inputs(type_rows, cfg.actor.template, processor, cfg.data), batch,
                                         "router features (type-label router)")
            labels = [EXPERT_INDEX[row_type(r, cfg.type_router.think_sources)] for r in type_rows]
            type_fit = ray.get(home.fit.remote(type_features, labels, cfg.router))
            type_logits = ray.get(home.route_logits.remote(features, type_fit.state))
            choices["type_labels"] = [EXPERTS[int(i)] for i in type_logits.argmax(1)]
            notes.append(f"type_labels: a router fitted on data-type labels (think for data_source in "
                         f"{list(cfg.type_router.think_sources)}, else fast; what Stage-SFT's router loss learns) by "
                         f"the same router trainer on the features of {len(type_rows)} training prompts "
                         f"({cfg.type_router.data_path or 'the default synthetic mix'}), not by a full Stage-SFT run")
        notes.append("every policy is scored on the same samples: both views answered every prompt "
                     f"({cfg.rollout.n} samples each, temperature {cfg.rollout.temperature}); a policy's answer to a "
                     "prompt is the samples of the expert it picks")

    groups = group_keys(rows, cfg.steps_at_least)
    report = {p: summarize_policy(groups, both.stats[THINK], both.stats[FAST], c) for p, c in choices.items()}
    outcomes = [Outcome(t.accuracy, f.accuracy, t.mean_tokens, f.mean_tokens)
                for t, f in zip(both.stats[THINK], both.stats[FAST])]
    trade = pareto_report(p_think, outcomes, [frontier_group(row) for row in rows], threshold,
                          {p: report[p][ALL] for p in choices})
    report["info"] = {"checkpoint": str(checkpoint), "data": cfg.data.path, "prompts": len(rows),
                      "samples_per_expert": cfg.rollout.n, "max_response_tokens": cfg.rollout.max_response_tokens,
                      "temperature": cfg.rollout.temperature, "margin": cfg.labels.margin,
                      "length_cost": cfg.labels.length_cost, "router": info,
                      "type_router_fit": type_fit.metrics if type_fit else None,
                      "router_agrees_with_oracle": _agreement(choices["hybrid"], choices["oracle"]),
                      "operating_point": info.get("operating_point"),
                      "timing": {**both.timing, "total_s": time.perf_counter() - start}, "notes": notes}
    report.update(trade)
    if both.sampled:
        report["sampled"] = sampled_table(groups, both.sampled, choices, cfg)
        notes.append(f"sampled: the same policies on {cfg.samples} answers per prompt and expert sampled at temperature "
                     f"{cfg.sample_temperature}, with the hindsight oracle on them and the cross-fitted oracle (the "
                     "expert the label rule picks from half of a prompt's samples, scored on the other half)")
    add_gap_recovered({p: report[p] for p in choices})
    _write(out, report, rows, both, choices)
    log.info("hybrid accuracy %.3f (think %.3f, fast %.3f, oracle %.3f), thinking ratio %.2f, tokens %.1f vs %.1f "
             "always-think; report in %s", report["hybrid"][ALL]["accuracy"], report["always_think"][ALL]["accuracy"],
             report["always_fast"][ALL]["accuracy"], report["oracle"][ALL]["accuracy"],
             report["hybrid"][ALL]["think_ratio"], report["hybrid"][ALL]["mean_tokens"],
             report["always_think"][ALL]["mean_tokens"], out / "report.md")
    return report


def sampled_table(groups: Sequence[list[str]], sampled: dict[str, list[ExpertStats]], choices: dict[str, list[str]],
                  cfg: EvaluateConfig) -> dict[str, dict]:
    """The policies scored on the sampled answers; the oracles recomputed on them: hindsight and cross-fitted."""
    think, fast = sampled[THINK], sampled[FAST]
    rule = (cfg.rollout.max_response_tokens, cfg.labels.margin, cfg.labels.length_cost)
    table = {p: summarize_policy(groups, think, fast, c) for p, c in choices.items() if p != "oracle"}
    table["oracle"] = summarize_policy(groups, think, fast, hindsight_choices(think, fast, *rule))
    table["oracle_cross_fitted"] = summarize_chosen(groups, cross_fitted(think, fast, *rule))
    return add_gap_recovered(table)


def _type_rows(cfg: EvaluateConfig, out: Path, processor) -> list[dict]:
    """Training rows of the type-label router: type_router.data_path, else the router stage's default mix."""
    import dataclasses

    from data_pipelines import load_dataset

    tr = cfg.type_router
    path = tr.data_path or synthetic_mix(dataclasses.replace(cfg.synthetic, rows=tr.synthetic_rows,
                                                             seed=tr.synthetic_seed), out / "type_router_data")
    return load_dataset(dataclasses.replace(cfg.data, path=path, max_rows=None), processor).rows


def _agreement(a: Sequence[str], b: Sequence[str]) -> Optional[float]:
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else None


def _write(out: Path, report: dict, rows: list[dict], both, choices: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    plot_report(report, out / "report.png")
    plot_pareto(report, out / "pareto.png")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            t, fa = both.stats[THINK][i], both.stats[FAST][i]
            f.write(json.dumps({"id": row["id"], "data_source": row["data_source"],
                                "steps": (row.get("extra_info") or {}).get("steps"),
                                "choices": {p: c[i] for p, c in choices.items()},
                                "acc_think": t.accuracy, "acc_fast": fa.accuracy,
                                "len_think": t.mean_tokens, "len_fast": fa.mean_tokens,
                                "responses_think": both.responses[THINK][i],
                                "responses_fast": both.responses[FAST][i]}) + "\n")
