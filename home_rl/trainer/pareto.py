"""The evaluation's trade-off: accuracy against mean response tokens, for every threshold and every alternative.

    router         the checkpoint's router at every threshold (home_rl/router/operating_point.py), its
                   operating point marked
    random         thinking on a random share r of prompts: expected accuracy and tokens on the line from
                   always-fast (r = 0) to always-think (r = 1)
    group_frontier routing whole groups of prompts (data source and step count) to one expert: the best
                   accuracy at each token budget over every assignment of groups to experts
    policies       always-think, always-fast, the oracles and the type-label router as single points

All from the same answers (both experts answered every prompt), so the points compare without sampling noise.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional, Sequence

from home_rl.router.operating_point import Outcome, routing_curve

MAX_FRONTIER_GROUPS = 16  # 2^16 assignments at most; more groups: the greedy hull alone


def random_line(outcomes: Sequence[Outcome], steps: int = 10) -> list[dict]:
    """Expected accuracy and tokens of thinking on a random share r of prompts, r = 0, 1/steps, ..., 1."""
    n = len(outcomes)
    fast_acc, think_acc = (sum(o.acc_fast for o in outcomes) / n, sum(o.acc_think for o in outcomes) / n)
    fast_tok, think_tok = (sum(o.tokens_fast for o in outcomes) / n, sum(o.tokens_think for o in outcomes) / n)
    return [{"think_ratio": r, "accuracy": fast_acc + r * (think_acc - fast_acc),
             "mean_tokens": fast_tok + r * (think_tok - fast_tok)} for r in (k / steps for k in range(steps + 1))]


def random_accuracy_at(outcomes: Sequence[Outcome], think_ratio: float) -> float:
    n = len(outcomes)
    return sum(o.acc_fast + think_ratio * (o.acc_think - o.acc_fast) for o in outcomes) / n


def group_frontier(groups: Sequence[str], outcomes: Sequence[Outcome]) -> list[dict]:
    """The Pareto front of sending each group (all its prompts) to one expert: points of the best accuracy for
    their mean tokens, cheapest first, each with the groups it sends to think."""
    names = sorted(set(groups))
    n = len(outcomes)
    gain = {g: 0.0 for g in names}
    extra = {g: 0.0 for g in names}
    for g, o in zip(groups, outcomes):
        gain[g] += (o.acc_think - o.acc_fast) / n
        extra[g] += (o.tokens_think - o.tokens_fast) / n
    base_acc = sum(o.acc_fast for o in outcomes) / n
    base_tok = sum(o.tokens_fast for o in outcomes) / n
    if len(names) <= MAX_FRONTIER_GROUPS:
        subsets = itertools.chain.from_iterable(itertools.combinations(names, k) for k in range(len(names) + 1))
    else:  # the greedy hull: groups by accuracy gained per extra token
        ranked = sorted(names, key=lambda g: -gain[g] / max(extra[g], 1e-9))
        subsets = (tuple(ranked[:k]) for k in range(len(ranked) + 1))
    points = [{"think_groups": list(s), "accuracy": base_acc + sum(gain[g] for g in s),
               "mean_tokens": base_tok + sum(extra[g] for g in s)} for s in subsets]
    points.sort(key=lambda p: (p["mean_tokens"], -p["accuracy"]))
    front, best = [], -1.0
    for p in points:
        if p["accuracy"] > best + 1e-12:
            front.append(p)
            best = p["accuracy"]
    return front


def frontier_accuracy_at(front: Sequence[dict], mean_tokens: float) -> Optional[float]:
    """The frontier's best accuracy at no more than `mean_tokens` (None: every point costs more)."""
    within = [p["accuracy"] for p in front if p["mean_tokens"] <= mean_tokens + 1e-9]
    return max(within) if within else None


def pareto_report(p_think: Sequence[float], outcomes: Sequence[Outcome], groups: Sequence[str], threshold: float,
                  policies: dict[str, dict]) -> dict:
    """report.json's `pareto` and `group_frontier`: the router's curve, the random line, the group frontier,
    the policies' points and the operating point, with how the operating point compares to each."""
    curve = routing_curve(p_think, outcomes)
    think_tokens = policies["always_think"]["mean_tokens"]
    front = group_frontier(groups, outcomes)
    hybrid = policies["hybrid"]
    at = frontier_accuracy_at(front, hybrid["mean_tokens"])
    above = [p.accuracy - random_accuracy_at(outcomes, p.think_ratio) for p in curve[1:-1]]
    return {
        "pareto": {
            "router": [p.as_dict() for p in curve],
            "random": random_line(outcomes),
            "policies": {name: {k: v[k] for k in ("accuracy", "mean_tokens", "think_ratio")}
                         for name, v in policies.items()},
            "operating_point": {"threshold": threshold, "accuracy": hybrid["accuracy"],
                                "mean_tokens": hybrid["mean_tokens"], "think_ratio": hybrid["think_ratio"],
                                "token_ratio": hybrid["mean_tokens"] / think_tokens if think_tokens else None},
            "min_lead_over_random": min(above) if above else None,
            "share_above_random": sum(a > 0 for a in above) / len(above) if above else None,
        },
        "group_frontier": {"points": front, "accuracy_at_operating_point": at,
                           "hybrid_minus_frontier": None if at is None else hybrid["accuracy"] - at},
    }


def plot_pareto(report: dict, path: Path) -> Path:
    """Accuracy against mean tokens: the router's curve, random routing, the group frontier, the policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pareto = report["pareto"]
    fig, ax = plt.subplots(figsize=(7, 5))
    curve: list[dict] = pareto["router"]
    ax.plot([p["mean_tokens"] for p in curve], [p["accuracy"] for p in curve], "-", lw=1.5, label="router, every threshold")
    rnd = pareto["random"]
    ax.plot([p["mean_tokens"] for p in rnd], [p["accuracy"] for p in rnd], "--", color="grey", label="random routing")
    front = report["group_frontier"]["points"]
    ax.step([p["mean_tokens"] for p in front], [p["accuracy"] for p in front], where="post", color="tab:green",
            alpha=0.7, label="routing by data source and steps (frontier)")
    for name, p in pareto["policies"].items():
        if name != "hybrid":
            ax.plot(p["mean_tokens"], p["accuracy"], "o", label=name.replace("_", " "))
    op = pareto["operating_point"]
    ax.plot(op["mean_tokens"], op["accuracy"], "*", ms=16, color="tab:red",
            label=f"operating point (threshold {op['threshold']:.2f})")
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

