"""Pull the final answer out of a response: the last `<answer>…</answer>` block, else the last `\\boxed{}`.

Everything here is a linear scan (str.rfind, one pass over braces): responses can be a megabyte of
junk, and a backtracking regex on such input would stall a worker.
"""
from __future__ import annotations

from typing import Optional

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


def final_answer(response: str) -> Optional[str]:
    """The answer a math-style response commits to: its `<answer>` block (or a `\\boxed{}` inside it),
    else the last `\\boxed{}` anywhere. None when the response gives neither."""
    block = answer_block(response)
    if block is not None:
        boxed = last_boxed(block)
        return boxed if boxed is not None else block
    return last_boxed(response)


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
