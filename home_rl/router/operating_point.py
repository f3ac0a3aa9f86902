"""The router's operating point: a threshold on P(think) that meets the trade the user asks for.

The router gives each prompt a probability that thinking pays. Thinking on every prompt whose probability is
above a threshold traces, as the threshold falls, a curve from always-fast to always-think: accuracy against
mean response tokens. `router.budget` picks a point on it, measured on prompts the router was not fitted on:

    ""             the router's argmax (threshold 0.5, a tie to fast): no calibration
    tokens=F       the most accurate point whose mean tokens are at most F x always-think's
    accuracy=D     the cheapest point whose accuracy is at most D points below always-think's

The checkpoint stores the threshold and one per OpenAI `reasoning_effort`: medium is the calibrated point,
low spends half of medium's extra tokens over always-fast (so thinks on fewer prompts), high always thinks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from home_rl.errors import ConfigError
from home_rl.experts import EXPERT_INDEX, THINK

ARGMAX_THRESHOLD = 0.5  # think where P(think) > 0.5: the router's argmax, an exact tie to fast
ALWAYS_THINK = -1.0  # below every probability: every prompt thinks
EFFORTS = ("low", "medium", "high")


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str  # tokens | accuracy
    value: float  # tokens: a fraction of always-think's mean tokens; accuracy: points below always-think's


def parse_budget(text: str, field: str = "router.budget") -> Optional[Budget]:
    """`tokens=F` (0 < F <= 1) or `accuracy=D` (D >= 0 points); "" is None (the argmax)."""
    if not text:
        return None
    kind, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or kind not in ("tokens", "accuracy") or not math.isfinite(number):
        raise ConfigError(f"{field}={text!r}: expected tokens=F (a fraction of always-think's mean tokens, e.g. "
                          "tokens=0.75) or accuracy=D (at most D points below always-think's accuracy, e.g. accuracy=1)")
    if kind == "tokens" and not 0 < number <= 1:
        raise ConfigError(f"{field}={text!r}: the token budget is a fraction of always-think's tokens, in (0, 1]")
    if kind == "accuracy" and number < 0:
        raise ConfigError(f"{field}={text!r}: the accuracy allowance is in points below always-think's, at least 0")
    return Budget(kind, number)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What each expert gives on one prompt (means over its samples)."""
    acc_think: float
    acc_fast: float
    tokens_think: float
    tokens_fast: float


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    threshold: float  # think where P(think) > threshold
    think_ratio: float
    accuracy: float
    mean_tokens: float
    token_ratio: float  # mean tokens / always-think's

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def routing_curve(p_think: Sequence[float], outcomes: Sequence[Outcome]) -> list[CurvePoint]:
    """Every distinct routing a threshold gives, from always-fast (threshold 1) to always-think (ALWAYS_THINK).
    A threshold sits halfway between neighbouring probabilities, so it routes unseen prompts as it routed these."""
    if len(p_think) != len(outcomes) or not outcomes:
        raise ValueError(f"{len(p_think)} probabilities for {len(outcomes)} prompts")
    n = len(outcomes)
    think_tokens = sum(o.tokens_think for o in outcomes)
    order = sorted(range(n), key=lambda i: -p_think[i])
    acc = sum(o.acc_fast for o in outcomes)
    tokens = sum(o.tokens_fast for o in outcomes)

    def point(threshold: float, thinking: int) -> CurvePoint:
        return CurvePoint(threshold, thinking / n, acc / n, tokens / n, tokens / think_tokens if think_tokens else 1.0)

    points = [point(1.0, 0)]
    for k, i in enumerate(order, 1):
        o = outcomes[i]
        acc += o.acc_think - o.acc_fast
        tokens += o.tokens_think - o.tokens_fast
        below = p_think[order[k]] if k < n else None
        if below is not None and below == p_think[i]:
            continue  # equal probabilities are one step: no threshold separates them
        points.append(point(ALWAYS_THINK if below is None else (p_think[i] + below) / 2, k))
    return points


def calibrate(curve: Sequence[CurvePoint], budget: Budget) -> CurvePoint:
    """The point of `curve` that meets `budget` best (see the module's docstring); always-fast when none can
    meet a token budget below it, always-think's own point for an accuracy floor nothing cheaper meets."""
    if budget.kind == "tokens":
        meeting = [p for p in curve if p.token_ratio <= budget.value + 1e-12] or [curve[0]]
        return max(meeting, key=lambda p: (p.accuracy, -p.mean_tokens))
    floor = curve[-1].accuracy - budget.value / 100
    meeting = [p for p in curve if p.accuracy >= floor - 1e-12]
    return min(meeting, key=lambda p: (p.mean_tokens, -p.accuracy))


def effort_thresholds(curve: Sequence[CurvePoint], medium: CurvePoint) -> dict[str, float]:
    """The threshold per reasoning_effort: low halves medium's tokens over always-fast, high always thinks."""
    low_tokens = curve[0].mean_tokens + (medium.mean_tokens - curve[0].mean_tokens) / 2
    low = [p for p in curve if p.mean_tokens <= low_tokens + 1e-9 and p.threshold >= medium.threshold]
    low_point = max(low, key=lambda p: (p.accuracy, -p.threshold)) if low else medium
    return {"low": low_point.threshold, "medium": medium.threshold, "high": ALWAYS_THINK}


def operating_point(p_think: Sequence[float], outcomes: Sequence[Outcome], budget: Optional[Budget]) -> dict:
    """What the checkpoint stores: the threshold, the budget asked, the thresholds per reasoning_effort and what
    the point gives on these prompts (accuracy, tokens, thinking ratio; always-think's and always-fast's beside)."""
    curve = routing_curve(p_think, outcomes)
    if budget is None:
        thinking = sum(p > ARGMAX_THRESHOLD for p in p_think)
        chosen = min(curve, key=lambda p: abs(p.think_ratio * len(outcomes) - thinking))
        chosen = dataclasses.replace(chosen, threshold=ARGMAX_THRESHOLD)
    else:
        chosen = calibrate(curve, budget)
    return {"threshold": chosen.threshold, "budget": "" if budget is None else f"{budget.kind}={budget.value:g}",
            "efforts": effort_thresholds(curve, chosen), "prompts": len(outcomes), "measured": chosen.as_dict(),
            "always_think": curve[-1].as_dict(), "always_fast": curve[0].as_dict()}


def think_probabilities(logits) -> list[float]:
    """P(think) per prompt from router logits [N, 2] (fast, think)."""
    return logits.float().softmax(-1)[:, EXPERT_INDEX[THINK]].tolist()


def threshold_of(home_config: dict, effort: Optional[str] = None) -> float:
    """The threshold a checkpoint routes with (for `effort`, when given); the argmax for a checkpoint without one."""
    point = home_config.get("router_operating_point") or {}
    if effort is None or effort == "medium":
        return float(point.get("threshold", ARGMAX_THRESHOLD))
    if effort == "high":
        return ALWAYS_THINK
    return float((point.get("efforts") or {}).get(effort, point.get("threshold", ARGMAX_THRESHOLD)))
