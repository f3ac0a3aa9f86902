"""The `reward` config section: which verifiers score which data source, with what weights and limits.

    reward:
      num_workers: 2
      timeout_s: 5.0
      sources:
        math: [{name: math, weight: 1.0}, {name: format, weight: 0.1}]
        my_set: [{name: path/to/checks.py:my_check}]

A sample's reward is the weighted sum of its source's verifier scores. Its `accuracy` is the score
of the first verifier that is not `format` (the correctness check); `format` is reported apart.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, Iterable, List, Mapping

from omegaconf import MISSING

from home_rl.errors import ConfigError
from home_rl.resources import Resources, resources_field
from reward.registry import label_of


@dataclasses.dataclass
class VerifierEntry:
    name: str = MISSING  # registered name (math, vqa, ocr, format, choice), entry-point name, or path/to/file.py:function
    weight: float = 1.0  # weight of this verifier's score in the sample's reward


def _entries(*pairs: tuple[str, float]) -> List[VerifierEntry]:
    return [VerifierEntry(name, weight) for name, weight in pairs]


def default_sources() -> Dict[str, List[VerifierEntry]]:
    """Verifiers for the built-in data sources (the synthetic families: math, arith, ocr, vqa, extract; choice)."""
    return {
        "math": _entries(("math", 1.0), ("format", 0.1)),
        "arith": _entries(("math", 1.0), ("format", 0.1)),
        "ocr": _entries(("ocr", 1.0), ("format", 0.1)),
        "vqa": _entries(("vqa", 1.0), ("format", 0.1)),
        "extract": _entries(("ocr", 1.0), ("format", 0.1)),  # copy a word/code/field exactly: OCR-style match
        "choice": _entries(("choice", 1.0), ("format", 0.1)),
    }


@dataclasses.dataclass
class RewardConfig:
    num_workers: int = 2  # reward worker actors (Ray) scoring a batch in parallel
    resources: Resources = resources_field()  # what each reward worker asks Ray for: cpus, node_resource (a sandbox process per worker runs the verifiers)
    timeout_s: float = 5.0  # hard limit per sample and verifier (batched verifiers: per sample in the call); past it the sample scores 0
    percent_as_fraction: bool = False  # math: a percentage also reads as a fraction (50\% matches 0.5, and still 50)
    ocr_metric: str = "exact"  # ocr: exact (normalised exact match) | anls (edit-distance similarity)
    anls_threshold: float = 0.5  # ocr with anls: similarities below this score 0
    sources: Dict[str, List[VerifierEntry]] = dataclasses.field(default_factory=default_sources)  # data_source -> weighted verifiers

    CHOICES: ClassVar[dict] = {"ocr_metric": ("exact", "anls")}
    MOVED: ClassVar[dict] = {"cpus_per_worker": "resources.cpus", "node_resource": "resources.node_resource"}

    def __post_init__(self):
        # OmegaConf 2.3 leaves the entries of a *new* sources key as plain dicts: make them VerifierEntry.
        self.sources = {str(source): [_as_entry(e, f"reward.sources.{source}.{i}") for i, e in enumerate(entries)]
                        for source, entries in self.sources.items()}

    def verifier_options(self, name: str) -> dict:
        """Keyword options this config passes to a built-in verifier."""
        if name == "math":
            return {"percent_as_fraction": self.percent_as_fraction}
        if name == "ocr":
            return {"anls": self.ocr_metric == "anls", "anls_threshold": self.anls_threshold}
        return {}


def _as_entry(value: Any, key: str) -> VerifierEntry:
    """A VerifierEntry from an entry or a {name, weight} mapping."""
    if isinstance(value, VerifierEntry):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected {{name: ..., weight: ...}}, got {value!r}")
    unknown = set(value) - {"name", "weight"}
    if unknown or not isinstance(value.get("name"), str):
        raise ConfigError(f"{key}: expected {{name: ..., weight: ...}} with a name, got {dict(value)!r}")
    try:
        weight = float(value.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(f"bad value for '{key}.weight': {value.get('weight')!r}; expected float") from None
    return VerifierEntry(value["name"], weight)


def check_reward_config(cfg: RewardConfig) -> None:
    """Raise ConfigError for values that cannot work (names the key)."""
    if cfg.num_workers < 1:
        raise ConfigError(f"reward.num_workers must be at least 1, got {cfg.num_workers}")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"reward.timeout_s must be positive, got {cfg.timeout_s}")
    if not cfg.sources:
        raise ConfigError("reward.sources is empty: map each data_source to a list of verifiers")
    for source, entries in cfg.sources.items():
        if not entries:
            raise ConfigError(f"reward.sources.{source} has no verifiers")
        labels = [label_of(e.name) for e in entries]
        for i, entry in enumerate(entries):
            if not math.isfinite(entry.weight):
                raise ConfigError(f"reward.sources.{source}.{i}.weight must be a finite number, got {entry.weight}")
            if labels.count(labels[i]) > 1:
                raise ConfigError(f"reward.sources.{source} lists verifier {labels[i]!r} twice")


def validate_sources(cfg: RewardConfig, data_sources: Iterable[str]) -> None:
    """Start-up check: every data_source of the data has verifiers configured (else name them all)."""
    unknown = sorted({str(s) for s in data_sources} - set(cfg.sources))
    if unknown:
        raise ConfigError(f"no reward verifiers for data_source {', '.join(map(repr, unknown))}; "
                          f"reward.sources knows: {', '.join(sorted(cfg.sources))} "
                          f"(add e.g. reward.sources.{unknown[0]}=[{{name: math}}])")
