"""From samples to verifier calls and back: the weighted reward of each sample, and batch metrics.

A sample is {id, response, ground_truth, data_source, extra_info}. Its result:

    {"id", "data_source",
     "score":    weighted sum of its verifiers' scores (a failed verifier counts 0),
     "accuracy": score of its correctness verifier (the first one that is not `format`), or None,
     "format":   score of the `format` verifier, or None,
     "scores":   {verifier label: score},
     "extra":    {verifier label: {key: value}}  (the extra keys of dict results),
     "error":    {verifier label: {"kind": "timeout" | "exception", "message": ...}}  (only when one failed)}
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from reward.config import RewardConfig
from reward.registry import label_of

FORMAT = "format"
FAILURE_KINDS = ("timeout", "exception")


def as_text(value: Any) -> str:
    """A response as valid text: None is empty, bytes are decoded, unpaired surrogates replaced."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # e.g. bytes decoded with surrogateescape
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def clean_sample(sample: dict, index: int) -> dict:
    extra_info = sample.get("extra_info")
    return {"id": sample.get("id", index), "response": as_text(sample.get("response")),
            "ground_truth": sample.get("ground_truth"), "data_source": str(sample.get("data_source")),
            "extra_info": dict(extra_info) if isinstance(extra_info, dict) else {}}


def plan_calls(samples: list[dict], cfg: RewardConfig, batched: dict[str, bool]) -> tuple[list, list[list[int]]]:
    """Verifier calls for `samples`: one per sample and verifier, one per chunk for a batched verifier.

    Returns the calls (spec, items) and, for each call, the indices of the samples it scores.
    """
    calls, owners = [], []
    batch_groups: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        for entry in cfg.sources[sample["data_source"]]:
            if batched[entry.name]:
                batch_groups[entry.name].append(i)
            else:
                calls.append((entry.name, [_item(sample)]))
                owners.append([i])
    for spec, indices in batch_groups.items():
        calls.append((spec, [_item(samples[i]) for i in indices]))
        owners.append(indices)
    return calls, owners


def _item(sample: dict) -> tuple:
    return sample["response"], sample["ground_truth"], sample["data_source"], sample["extra_info"]


def assemble(samples: list[dict], cfg: RewardConfig, calls: list, owners: list[list[int]],
             outcomes: list[list[tuple]]) -> list[dict]:
    """Per-sample results from the outcomes of `plan_calls`'s calls, in the order of `samples`."""
    got: list[dict[str, tuple]] = [{} for _ in samples]
    for (spec, _), indices, results in zip(calls, owners, outcomes):
        for i, outcome in zip(indices, results):
            got[i][spec] = outcome
    results = []
    for sample, by_spec in zip(samples, got):
        result = {"id": sample["id"], "data_source": sample["data_source"], "score": 0.0,
                  "accuracy": None, "format": None, "scores": {}, "extra": {}}
        for entry in cfg.sources[sample["data_source"]]:
            label = label_of(entry.name)
            outcome = by_spec[entry.name]
            if outcome[0] == "ok":
                score, extras = outcome[1], outcome[2]
                if extras:
                    result["extra"][label] = extras
            else:
                score = 0.0
                result.setdefault("error", {})[label] = {"kind": outcome[0], "message": outcome[1]}
            result["scores"][label] = score
            result["score"] += entry.weight * score
            if label == FORMAT:
                result["format"] = score
            elif result["accuracy"] is None:
                result["accuracy"] = score
        results.append(result)
    return results


def summarize(results: list[dict]) -> dict[str, float]:
    """Batch metrics: mean reward/accuracy/format, per-verifier means (numeric extras too),
    per-source accuracy, and failure counts per verifier and kind."""
    values: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, int] = {}
    for r in results:
        values["reward/score"].append(r["score"])
        for key in ("accuracy", "format"):
            if r[key] is not None:
                values[f"reward/{key}"].append(r[key])
        if r["accuracy"] is not None:
            values[f"reward/by_source/{r['data_source']}/accuracy"].append(r["accuracy"])
        for label, score in r["scores"].items():
            values[f"reward/{label}"].append(score)
            for kind in FAILURE_KINDS:
                failures.setdefault(f"reward/failures/{label}/{kind}", 0)
        for label, extras in r["extra"].items():
            for key, value in extras.items():
                if isinstance(value, (bool, int, float)) and math.isfinite(value):
                    values[f"reward/{label}/{key}"].append(float(value))
        for label, error in r.get("error", {}).items():
            failures[f"reward/failures/{label}/{error['kind']}"] += 1
    metrics = {key: sum(v) / len(v) for key, v in values.items()}
    metrics.update(failures)
    metrics["reward/failures"] = sum(failures.values())
    return metrics
