"""`ocr`: normalised exact match of read text, or ANLS (average normalised Levenshtein similarity).

Normalisation: case folded, runs of whitespace made one space, ends stripped. Exact match scores 1
when the answer equals any ground truth. ANLS (`anls=True`) scores 1 - edit distance / longer length
against the closest ground truth, and 0 when that similarity is below `anls_threshold` (0.5, as in
DocVQA/ST-VQA), so half-right reads earn partial credit.
"""
from __future__ import annotations

from typing import Optional

from reward.registry import register_verifier
from reward.verifiers.extract import answer_or_text, as_list


def normalize_ocr(text: str) -> str:
    return " ".join(str(text).casefold().split())


@register_verifier("ocr")
def ocr_verifier(response: str, ground_truth, *, data_source: str = "", extra_info: Optional[dict] = None,
                 anls: bool = False, anls_threshold: float = 0.5) -> dict:
    answer = normalize_ocr(answer_or_text(response or ""))
    truths = [normalize_ocr(t) for t in as_list(ground_truth)]
    if not truths:
        return {"score": 0.0}
    if not anls:
        return {"score": float(answer in truths)}
    best = max(_similarity(answer, t, anls_threshold) for t in truths)
    return {"score": best if best >= anls_threshold else 0.0}


def _similarity(a: str, b: str, threshold: float) -> float:
    """1 - Levenshtein(a, b) / max(len): 0 early when the length gap alone puts it under `threshold`."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    if 1.0 - abs(len(a) - len(b)) / longest < threshold:  # distance >= length gap: skip the O(n*m) table
        return 0.0
    return 1.0 - levenshtein(a, b) / longest


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute cost 1), one row of the table at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
