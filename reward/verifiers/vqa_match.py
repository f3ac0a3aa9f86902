"""`vqa`: VQA-style normalised exact match, with soft accuracy over several ground truths.

Both sides are normalised the way VQA evaluation does: lower case, punctuation dropped (a decimal
point and digits' thousands separators kept apart), articles removed, number words to digits.
One ground truth: 1 or 0. Several (VQA's ten annotators): min(#ground truths equal to the answer / 3, 1).
"""
from __future__ import annotations

import re
from typing import Optional

from reward.registry import register_verifier
from reward.verifiers.extract import answer_or_text, as_list

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCTUATION = re.compile(r"[^\w\s.]|_|(?<!\d)\.|\.(?!\d)")  # a '.' survives only between digits


def normalize_vqa(text: str) -> str:
    text = str(text).lower().replace("\n", " ").replace("\t", " ")
    text = _THOUSANDS.sub("", text).replace("'", "")  # 1,000 -> 1000; don't -> dont
    text = _PUNCTUATION.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


@register_verifier("vqa")
def vqa_verifier(response: str, ground_truth, *, data_source: str = "", extra_info: Optional[dict] = None) -> dict:
    answer = normalize_vqa(answer_or_text(response or ""))
    truths = [normalize_vqa(t) for t in as_list(ground_truth)]
    if not answer or not truths:
        return {"score": 0.0}
    matches = sum(answer == t for t in truths)
    score = min(matches / 3.0, 1.0) if len(truths) > 1 else float(matches > 0)
    return {"score": score}
