"""Router labels from rollouts: per prompt, each expert's accuracy and mean length, and the rule that picks one.

Think wins only where its accuracy gain pays for its extra length:

    acc_think - acc_fast > margin + length_cost * (len_think - len_fast) / max_response_tokens

and everything else, ties included, goes to fast (the cheaper expert). A record keeps every number
behind its label, so a labelled set can be audited and re-labelled with other knobs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from home_rl.errors import HomeRLError
from home_rl.experts import EXPERT_INDEX, FAST, THINK

# Accuracies are means over a few samples and the threshold a sum of floats: a gain equal to the
# threshold up to rounding is a tie, and ties go to fast.
TIE_TOLERANCE = 1e-9


@dataclasses.dataclass
class ExpertStats:
    """One expert's samples on one prompt."""
    scores: list[float]  # correctness of each sample (the verifier's accuracy, else its reward)
    tokens: list[int]  # response length of each sample
    formats: list[Optional[float]] = dataclasses.field(default_factory=list)  # format score of each sample (None: no format verifier)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens) if self.tokens else 0.0

    @property
    def format_rate(self) -> Optional[float]:
        known = [f for f in self.formats if f is not None]
        return sum(known) / len(known) if known else None


def expert_stats(results: Sequence[dict], tokens: Sequence[int]) -> ExpertStats:
    """Stats of one prompt's samples from RewardPool results (accuracy, else score) and response lengths."""
    if len(results) != len(tokens):
        raise ValueError(f"{len(results)} scores for {len(tokens)} samples")
    scores = [float(r["accuracy"] if r.get("accuracy") is not None else r["score"]) for r in results]
    return ExpertStats(scores, [int(t) for t in tokens], [r.get("format") for r in results])


def think_threshold(len_think: float, len_fast: float, max_response_tokens: int, margin: float,
                    length_cost: float) -> float:
    """The accuracy gain think needs on a prompt: the margin plus the price of its extra length."""
    if max_response_tokens < 1:
        raise ValueError(f"max_response_tokens must be at least 1, got {max_response_tokens}")
    return margin + length_cost * (len_think - len_fast) / max_response_tokens


def derive_label(acc_think: float, acc_fast: float, len_think: float, len_fast: float, max_response_tokens: int,
                 margin: float = 0.0, length_cost: float = 0.1) -> str:
    """'think' where the accuracy gain beats the threshold, else 'fast' (ties included)."""
    gain = acc_think - acc_fast
    threshold = think_threshold(len_think, len_fast, max_response_tokens, margin, length_cost)
    return THINK if gain - threshold > TIE_TOLERANCE else FAST


def label_record(row: dict, think: ExpertStats, fast: ExpertStats, max_response_tokens: int, margin: float,
                 length_cost: float, type_label: Optional[str] = None) -> dict:
    """The labelled row: its label and every number behind it (per-sample scores and lengths included)."""
    if not think.n or not fast.n:
        raise ValueError(f"row {row.get('id')!r}: no samples from the {'think' if not think.n else 'fast'} expert")
    threshold = think_threshold(think.mean_tokens, fast.mean_tokens, max_response_tokens, margin, length_cost)
    label = derive_label(think.accuracy, fast.accuracy, think.mean_tokens, fast.mean_tokens, max_response_tokens,
                         margin, length_cost)
    record = {
        "id": row["id"], "data_source": row.get("data_source"), "steps": (row.get("extra_info") or {}).get("steps"),
        "label": label, "acc_think": think.accuracy, "acc_fast": fast.accuracy,
        "len_think": think.mean_tokens, "len_fast": fast.mean_tokens,
        "gain": think.accuracy - fast.accuracy, "threshold": threshold,
        "margin": margin, "length_cost": length_cost, "max_response_tokens": max_response_tokens,
        "n_think": think.n, "n_fast": fast.n,
        "format_think": think.format_rate, "format_fast": fast.format_rate,
        "scores_think": think.scores, "scores_fast": fast.scores,
        "tokens_think": think.tokens, "tokens_fast": fast.tokens,
    }
    if type_label is not None:
        record["type_label"] = type_label
    return record


LABEL_NUMBERS = ("acc_think", "acc_fast", "len_think", "len_fast", "max_response_tokens")


def has_numbers(record: dict, keys: Sequence[str]) -> bool:
    return all(isinstance(record.get(k), (int, float)) for k in keys)


def has_gain(record: dict) -> bool:
    """Whether the record carries the gain and threshold that router.target=expected_gain fits."""
    return has_numbers(record, ("gain", "threshold"))


def relabel(record: dict, margin: float, length_cost: float) -> dict:
    """The record under other knobs: its label, threshold, margin and length_cost recomputed from its numbers
    (a record without them, e.g. labels made elsewhere, is returned as it is)."""
    if not has_numbers(record, LABEL_NUMBERS):
        return record
    acc_think, acc_fast, len_think, len_fast, max_tokens = (record[k] for k in LABEL_NUMBERS)
    return {**record, "label": derive_label(acc_think, acc_fast, len_think, len_fast, max_tokens, margin, length_cost),
            "gain": acc_think - acc_fast, "threshold": think_threshold(len_think, len_fast, max_tokens, margin, length_cost),
            "margin": margin, "length_cost": length_cost}


def net_gains(records: Sequence[dict]) -> Optional[list[float]]:
    """Each record's gain minus its threshold (what router.target=expected_gain fits); None when a record lacks them."""
    if not all(map(has_gain, records)):
        return None
    return [r["gain"] - r["threshold"] for r in records]


def write_labels(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records as JSONL, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


def read_labels(path: str | Path) -> list[dict]:
    """Records of a labels.jsonl; a missing file, a broken line or a record without id/label is a HomeRLError."""
    path = Path(path)
    if not path.is_file():
        raise HomeRLError(f"labels file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HomeRLError(f"{path}, line {number}: not JSON ({e})") from None
        if not isinstance(record, dict) or "id" not in record or record.get("label") not in EXPERT_INDEX:
            raise HomeRLError(f"{path}, line {number}: a label record needs an id and a label of fast or think")
        records.append(record)
    return records


def class_counts(labels: Iterable[str]) -> dict[str, int]:
    counts = {FAST: 0, THINK: 0}
    for label in labels:
        counts[label] += 1
    return counts
