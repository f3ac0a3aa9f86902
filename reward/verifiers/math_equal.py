"""`math`: is the response's final answer mathematically equal to the ground truth? (math-verify)

The final answer is the `<answer>` block, else the last `\\boxed{}`, else the number after the last
`####` (GSM8K); a ground truth of GSM8K's form (`...reasoning... #### 72`) is read the same way.
math-verify parses both sides to SymPy and compares them: fractions, decimals, LaTeX, intervals, sets,
equations (`x=3` vs `3`), units stripped. A percentage reads as its number (`50\\%` = 50); with
`percent_as_fraction` it also reads as the fraction (`50\\%` = 0.5), so `0.5` and `50\\%` then match
either way.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Optional

from math_verify import parse, verify

from reward.registry import register_verifier
from reward.verifiers.extract import as_list, final_answer, gold_answer

MAX_ANSWER_CHARS = 2000  # longer "answers" (degenerate generations) score 0 unparsed, flagged `too_long`
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # $ (not \$), \( or \[
# math-verify's own time limits use signal.alarm, which only works on a process's main thread.
# The reward pool runs verifiers on a sandbox process's main thread and adds a hard limit of its own.
_MATH_VERIFY_TIMEOUT_S = 5


@register_verifier("math")
def math_verifier(response: str, ground_truth, *, data_source: str = "", extra_info: Optional[dict] = None,
                  percent_as_fraction: bool = False) -> dict:
    answer = final_answer(response or "")
    if not answer:
        return {"score": 0.0, "has_answer": False}
    if len(answer) > MAX_ANSWER_CHARS:  # no final answer is this long; parsing it would take seconds
        return {"score": 0.0, "has_answer": True, "too_long": True}
    predicted = _parse_answer(answer, percent_as_fraction)
    golds = [g for gt in as_list(ground_truth) for g in _parse_gold(gold_answer(str(gt)), percent_as_fraction)]
    correct = bool(predicted) and bool(golds) and verify(golds, predicted, timeout_seconds=_timeout())
    return {"score": float(correct), "has_answer": True}


def _warm_up() -> None:
    """math-verify's first parse builds its parser tables (0.1 s, seconds on a busy machine): the reward
    sandbox calls this before it reports ready, so no time limit is spent on it."""
    math_verifier("<answer>\\frac{1}{2}</answer>", "0.5")


math_verifier.warm_up = _warm_up


@lru_cache(maxsize=4096)  # ground truths repeat across the n samples of a prompt
def _parse_gold(text: str, percent_as_fraction: bool) -> tuple:
    return tuple(_parse_answer(text, percent_as_fraction))


def _parse_answer(text: str, percent_as_fraction: bool) -> list:
    """SymPy readings of one answer string (an empty list when nothing parses)."""
    text = text.strip()
    is_percent = text.endswith("%")
    if is_percent:
        text = text[:-1].removesuffix("\\").rstrip()
    # Inside $…$ math-verify reads the whole string as LaTeX (`x=3` stays an equation); a bare string
    # is the fallback for prose answers such as "5 dollars".
    wrapped = text if _MATH_DELIMITER.search(text) else f"${text}$"
    parsed = parse(wrapped, parsing_timeout=_timeout())
    if not _has_sympy(parsed):
        parsed = parse(text, parsing_timeout=_timeout())
    if is_percent and percent_as_fraction:
        parsed = list(parsed) + [p / 100 for p in parsed if not isinstance(p, str) and getattr(p, "is_number", False)]
    return parsed


def _has_sympy(parsed: list) -> bool:
    return any(not isinstance(p, str) for p in parsed)


def _timeout() -> Optional[int]:
    return _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
