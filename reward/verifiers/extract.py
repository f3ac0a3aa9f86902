"""Pull the final answer out of a response: the last `<answer>…</answer>` block, else the last `\\boxed{}`,
else GSM8K's `#### N` line.

Everything here is a linear scan (str.rfind, one pass over braces): responses can be a megabyte of
junk, and a backtracking regex on such input would stall a worker.
"""
from __future__ import annotations

import re
from typing import Optional

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HASHES = "####"  # GSM8K's final-answer marker: `...reasoning... #### 72`
_LEADING_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")  # anchored with .match on a short slice: linear


def answer_block(response: str) -> Optional[str]:
    """Text of the last complete `<answer>…</answer>` block, stripped (None when there is none)."""
    end = response.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = response.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return response[start + len(ANSWER_OPEN):end].strip()


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{…}` (or `\\fbox{…}`) with balanced braces (None when there is none).

    Only the last occurrence is tried: retrying earlier ones on unbalanced input would be quadratic.
    """
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command)
        if start >= 0:
            return _group_after(text, start + len(command))
    return None


def _group_after(text: str, pos: int) -> Optional[str]:
    """The `{…}` group at `pos`, stripped; after a space a bare token counts too (`\\boxed 5` gives '5')."""
    start = pos
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return None
    if text[start] != "{":
        return text[start:start + 200].split(maxsplit=1)[0].rstrip("$.") if start > pos else None
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch in "{}" and text[i - 1] == "\\":  # \{ and \} are LaTeX set braces, not groups
            continue
        depth += 1 if ch == "{" else -1 if ch == "}" else 0
        if depth == 0:
            return text[start + 1:i].strip()
    return None  # unbalanced


def after_hashes(text: str) -> Optional[str]:
    """The answer on the last `####` line, as verl's gsm8k scorer reads it: the number there with thousands
    commas and `$` removed (`#### $1,200` gives '1200'), else the rest of the line. None without `####`."""
    start = text.rfind(HASHES)
    if start < 0:
        return None
    rest = text[start + len(HASHES):start + len(HASHES) + 200].lstrip(" #").split("\n", 1)[0].strip()
    number = _LEADING_NUMBER.match(rest.replace(",", "").replace("$", ""))
    return number.group(0) if number else (rest or None)


def final_answer(response: str) -> Optional[str]:
    """The answer a math-style response commits to: its `<answer>` block (or a `\\boxed{}` or `#### N` inside
    it), else the last `\\boxed{}` anywhere, else the last `#### N` line. None when the response gives none."""
    block = answer_block(response)
    if block is not None:
        inner = last_boxed(block)
        if inner is None:
            inner = after_hashes(block)
        return inner if inner is not None else block
    boxed = last_boxed(response)
    return boxed if boxed is not None else after_hashes(response)


def gold_answer(ground_truth: str) -> str:
    """A ground truth as the answer to compare: GSM8K's `...reasoning... #### 72` gives '72'; others as given."""
    hashed = after_hashes(ground_truth)
    return hashed if hashed is not None else ground_truth


def answer_or_text(response: str) -> str:
    """The `<answer>` block when there is one, else the whole response with any think block removed."""
    block = answer_block(response)
    if block is not None:
        return block
    end = response.rfind(THINK_CLOSE)
    return (response[end + len(THINK_CLOSE):] if end >= 0 else response).strip()


def as_list(ground_truth) -> list:
    """Ground truth as a list of accepted answers (a single value becomes a one-element list)."""
    if ground_truth is None:
        return []
    if isinstance(ground_truth, (list, tuple, set, frozenset)):
        return [g for g in ground_truth if g is not None]
    return [ground_truth]
