"""`choice`: multiple-choice letter extraction and match.

The letter is read from the final answer (the `<answer>` block, else the last `\\boxed{}`, else the
text after `</think>`): a leading letter ("B", "(B)", "B. Paris"), else the last "answer is B" /
"option B", else the last "(B)". When `extra_info["choices"]` lists the option texts, an answer
that is exactly one option's text counts as that option's letter. The ground truth is a letter
(or an option's text, with `choices`); several ground truths mean any of them is right.
"""
from __future__ import annotations

import re
from typing import Optional

from reward.registry import register_verifier
from reward.verifiers.extract import answer_block, answer_or_text, as_list, last_boxed

_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_LEADING = re.compile(r"\(?([A-Z])\)?(?=$|[.:,)\]])")  # "B", "(B)", "B. Paris", "B) Paris"; not "I think"
_NAMED = re.compile(r"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b")
_PARENTHESISED = re.compile(r"\(([A-Z])\)")


@register_verifier("choice")
def choice_verifier(response: str, ground_truth, *, data_source: str = "", extra_info: Optional[dict] = None) -> dict:
    choices = list((extra_info or {}).get("choices") or [])
    response = response or ""
    text = answer_block(response)
    if text is None:
        text = last_boxed(response)
    picked = extract_choice(text if text is not None else answer_or_text(response), choices)
    truths = {extract_choice(str(t), choices) for t in as_list(ground_truth)} - {None}
    return {"score": float(picked is not None and picked in truths), "choice": picked or ""}


def extract_choice(text: str, choices: Optional[list] = None) -> Optional[str]:
    """The option letter `text` commits to, or None."""
    text = _LATEX_TEXT.sub(r"\1", text).replace("$", "").strip()
    if len(text) == 1 and "a" <= text.lower() <= "z":  # a bare letter, in either case
        return text.upper()
    m = _LEADING.match(text)
    if m:
        return m.group(1)
    for pattern in (_NAMED, _PARENTHESISED):
        found = pattern.findall(text)
        if found:
            return found[-1]
    wanted = _plain(text)
    for i, option in enumerate(choices or []):
        if wanted and _plain(str(option)) == wanted:
            return chr(ord("A") + i)
    return None


def _plain(text: str) -> str:
    return " ".join(text.casefold().strip(" .").split())
