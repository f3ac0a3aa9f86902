"""From samples to verifier calls and back: the weighted reward of each sample, and batch metrics.

A sample, as the drivers send it (home_rl/trainer/startup.py `reward_inputs`):

    {"id", "response", "ground_truth", "data_source", "extra_info",
     "prompt":       the row's prompt: text, or chat messages [{"role", "content"}]  (optional)
     "prompt_text":  the prompt as the model saw it, chat template applied  (optional: the prompt's text)
     "response_ids": the response's token ids  (optional: response_length is then its number of words)
     "columns":      the row's other columns (id, answer, solution, ...; not prompt, images, extra_info)  (optional)}

Its result:

    {"id", "data_source",
     "score":    weighted sum of its verifiers' scores (a failed verifier counts 0),
     "accuracy": score of its correctness verifier (the first one that is not `format`), or None,
     "format":   score of the `format` verifier, or None,
     "scores":   {verifier label: score},
     "extra":    {verifier label: {key: value}}  (the extra keys of dict results),
     "error":    {verifier label: {"kind": "timeout" | "exception", "message": ...}}  (only when one failed)}
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

from reward.config import RewardConfig, entry_key, entry_label
from reward.styles import Convention

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
    """A sample with every field any calling style reads, of the types it expects."""
    extra_info = sample.get("extra_info")
    response = as_text(sample.get("response"))
    prompt = sample.get("prompt")
    prompt = [dict(m) for m in prompt] if isinstance(prompt, (list, tuple)) else as_text(prompt)
    prompt_text = sample.get("prompt_text")
    ids = sample.get("response_ids")
    return {"id": sample.get("id", index), "response": response, "ground_truth": sample.get("ground_truth"),
            "data_source": str(sample.get("data_source")),
            "extra_info": dict(extra_info) if isinstance(extra_info, dict) else {},
            "prompt": prompt, "prompt_text": as_text(prompt_text) if prompt_text is not None else prompt_as_text(prompt),
            "response_ids": [int(t) for t in ids] if ids is not None else [],
            "response_length": len(ids) if ids is not None else len(response.split()),
            "columns": dict(sample.get("columns") or {})}


def prompt_as_text(prompt: Any) -> str:
    """A prompt's text: itself, or its messages' contents one per line (text parts of multimodal contents)."""
    if not isinstance(prompt, list):
        return as_text(prompt)
    lines = []
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image"}]
            content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        lines.append(as_text(content))
    return "\n".join(lines)


def plan_calls(samples: list[dict], cfg: RewardConfig, conventions: dict[str, Convention]
               ) -> tuple[list[tuple], list[list[int]]]:
    """Verifier calls for `samples`: one per sample and verifier, one per chunk for a batched verifier.

    Returns the calls (key, items, limit_s) and, for each call, the indices of the samples it scores.
    A call's limit is reward.timeout_s per sample in it; a remote server's is reward.timeout_s per request.
    """
    calls, owners = [], []
    batch_groups: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        for entry in cfg.sources[sample["data_source"]]:
            key = entry_key(entry)
            if conventions[key].batched:
                batch_groups[key].append(i)
            else:
                calls.append((key, [samples[i]], cfg.timeout_s))
                owners.append([i])
    for key, indices in batch_groups.items():
        per_request = conventions[key].style == "remote"
        calls.append((key, [samples[i] for i in indices], cfg.timeout_s * (1 if per_request else len(indices))))
        owners.append(indices)
    return calls, owners


def as_units(calls: list[tuple], conventions: dict[str, Convention]) -> tuple[list[list[tuple]], list[int]]:
    """The sandbox's units: every `async def` call in one unit that runs them concurrently, then each other call
    alone. Also returns the index in `calls` of each call, in the units' order."""
    gathered = [i for i, call in enumerate(calls) if conventions[call[0]].asynchronous]
    alone = [i for i, call in enumerate(calls) if not conventions[call[0]].asynchronous]
    units = ([[calls[i] for i in gathered]] if gathered else []) + [[calls[i]] for i in alone]
    return units, gathered + alone


def assemble(samples: list[dict], cfg: RewardConfig, calls: list, owners: list[list[int]],
             outcomes: list[list[tuple]]) -> list[dict]:
    """Per-sample results from the outcomes of `plan_calls`'s calls, in the order of `samples`."""
    got: list[dict[str, tuple]] = [{} for _ in samples]
    for (key, _, _), indices, results in zip(calls, owners, outcomes):
        for i, outcome in zip(indices, results):
            got[i][key] = outcome
    results = []
    for sample, by_key in zip(samples, got):
        result = {"id": sample["id"], "data_source": sample["data_source"], "score": 0.0,
                  "accuracy": None, "format": None, "scores": {}, "extra": {}}
        for entry in cfg.sources[sample["data_source"]]:
            label = entry_label(entry)
            outcome = by_key[entry_key(entry)]
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
    """Batch metrics: mean reward/accuracy/format, per-source accuracy, and per data source and verifier: its mean
    score (`reward/verifier/<source>/<label>`, numeric extras below it) and its failures by kind
    (`reward/failures/<source>/<label>/<kind>`)."""
    values: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, int] = {}
    for r in results:
        source = r["data_source"]
        values["reward/score"].append(r["score"])
        for key in ("accuracy", "format"):
            if r[key] is not None:
                values[f"reward/{key}"].append(r[key])
        if r["accuracy"] is not None:
            values[f"reward/by_source/{source}/accuracy"].append(r["accuracy"])
        for label, score in r["scores"].items():
            values[f"reward/verifier/{source}/{label}"].append(score)
            for kind in FAILURE_KINDS:
                failures.setdefault(f"reward/failures/{source}/{label}/{kind}", 0)
        for label, extras in r["extra"].items():
            for key, value in extras.items():
                if isinstance(value, (bool, int, float)) and math.isfinite(value):
                    values[f"reward/verifier/{source}/{label}/{key}"].append(float(value))
        for label, error in r.get("error", {}).items():
            failures[f"reward/failures/{source}/{label}/{error['kind']}"] += 1
    metrics = {key: sum(v) / len(v) for key, v in values.items()}
    metrics.update(failures)
    metrics["reward/failures"] = sum(failures.values())
    return metrics


@dataclasses.dataclass
class VerifierFailures:
    source: str  # the data source
    label: str  # the verifier entry's label
    failed: int  # samples of this batch it failed on
    samples: int  # samples of this batch it scored
    kinds: dict[str, int]  # failures by kind (timeout, exception)
    first: tuple[Any, str, str]  # (sample id, kind, message) of the first failure

    @property
    def rate(self) -> float:
        return self.failed / max(self.samples, 1)


def failures_by_verifier(results: list[dict]) -> list[VerifierFailures]:
    """Per (data source, verifier entry) that failed on any sample of `results`: how often, and the first error."""
    seen: dict[tuple[str, str], int] = defaultdict(int)
    failed: dict[tuple[str, str], VerifierFailures] = {}
    for r in results:
        for label in r["scores"]:
            seen[(r["data_source"], label)] += 1
        for label, error in r.get("error", {}).items():
            key = (r["data_source"], label)
            if key not in failed:
                failed[key] = VerifierFailures(key[0], label, 0, 0, defaultdict(int), (r["id"], error["kind"], error["message"]))
            failed[key].failed += 1
            failed[key].kinds[error["kind"]] += 1
    for key, f in failed.items():
        f.samples, f.kinds = seen[key], dict(f.kinds)
    return list(failed.values())


def row_columns(row: dict) -> dict:
    """A data row's columns that a sample carries along (TRL passes them as keywords): all but the prompt, the
    images (heavy, and already in the prompt the model saw) and extra_info (a sample carries that itself)."""
    return {k: v for k, v in row.items() if k not in ("prompt", "images", "extra_info")}
