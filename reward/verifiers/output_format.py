"""`format`: does the response follow its expert's output template?

    think expert: <think>non-empty reasoning</think><answer>…</answer>
    fast expert:  <think></think><answer>…</answer>

The expert comes from `extra_info["expert"]` ("think" when absent). Each tag appears once, in this
order, with only whitespace around and between the blocks, and the answer is not empty.
"""
from __future__ import annotations

from typing import Optional

from home_rl.experts import EXPERTS, THINK
from reward.registry import register_verifier
from reward.verifiers.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN


@register_verifier("format")
def format_verifier(response: str, ground_truth=None, *, data_source: str = "",
                    extra_info: Optional[dict] = None) -> dict:
    expert = (extra_info or {}).get("expert") or THINK
    if expert not in EXPERTS:
        raise ValueError(f"extra_info['expert'] is {expert!r}; expected one of {EXPERTS}")
    blocks = split_template(response or "")
    if blocks is None:
        return {"score": 0.0}
    think, answer = blocks
    right_think = bool(think) if expert == THINK else not think
    return {"score": float(right_think and bool(answer))}


def split_template(response: str) -> Optional[tuple[str, str]]:
    """(think text, answer text), both stripped, when `response` has the template's shape; else None."""
    text = response.strip()
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return None
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return None
    think_end = text.index(THINK_CLOSE)
    answer_start = text.index(ANSWER_OPEN)
    if answer_start < think_end or text[think_end + len(THINK_CLOSE):answer_start].strip():
        return None
    think = text[len(THINK_OPEN):think_end].strip()
    answer = text[answer_start + len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip()
    return think, answer
