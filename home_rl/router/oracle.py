"""What a routing earns per prompt, and the two oracles the evaluation holds the router against.

    hindsight      the label rule applied to the very answers it is scored on: it sees which expert was
                   right on this prompt this time, so part of its lead is luck
    cross-fitted   the label rule applied to half of a prompt's sampled answers per expert, scored on the
                   other half (and the halves swapped, averaged): a choice made without seeing the answers it
                   is scored on, which is the most a router that reads the prompt can hope for
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from home_rl.experts import THINK
from home_rl.router.labels import ExpertStats, derive_label


@dataclasses.dataclass(frozen=True)
class Chosen:
    """What one prompt's routing gives."""
    accuracy: float
    tokens: float
    think: float  # share of the prompt's decisions that went to think (a cross-fitted prompt has two)


def chosen_by(choices: Sequence[str], think: Sequence[ExpertStats], fast: Sequence[ExpertStats]) -> list[Chosen]:
    """Each prompt's result when `choices` picks the expert: that expert's mean accuracy and length."""
    out = []
    for choice, t, f in zip(choices, think, fast, strict=True):
        chosen = t if choice == THINK else f
        out.append(Chosen(chosen.accuracy, chosen.mean_tokens, float(choice == THINK)))
    return out


def hindsight_choices(think: Sequence[ExpertStats], fast: Sequence[ExpertStats], max_response_tokens: int,
                      margin: float, length_cost: float) -> list[str]:
    return [derive_label(t.accuracy, f.accuracy, t.mean_tokens, f.mean_tokens, max_response_tokens, margin, length_cost)
            for t, f in zip(think, fast)]


def cross_fitted(think: Sequence[ExpertStats], fast: Sequence[ExpertStats], max_response_tokens: int, margin: float,
                 length_cost: float) -> list[Chosen]:
    """The cross-fitted oracle per prompt: the label rule on one half of each expert's samples picks, the other
    half scores; both ways round, averaged. Needs at least 2 samples per expert (an odd last one is unused)."""
    out = []
    for t, f in zip(think, fast, strict=True):
        half = min(t.n, f.n) // 2
        if half == 0:
            raise ValueError(f"the cross-fitted oracle needs at least 2 samples per expert, got {t.n} and {f.n}")
        first, second = slice(0, half), slice(half, 2 * half)
        acc = tokens = thinks = 0.0
        for pick, score in ((first, second), (second, first)):
            choice = derive_label(_mean(t.scores[pick]), _mean(f.scores[pick]), _mean(t.tokens[pick]),
                                  _mean(f.tokens[pick]), max_response_tokens, margin, length_cost)
            chosen = t if choice == THINK else f
            acc += _mean(chosen.scores[score]) / 2
            tokens += _mean(chosen.tokens[score]) / 2
            thinks += float(choice == THINK) / 2
        out.append(Chosen(acc, tokens, thinks))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
