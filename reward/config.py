"""The `reward` config section: which verifiers score which data source, with what weights and limits.

    reward:
      num_workers: 2
      timeout_s: 5.0
      sources:
        math: [{name: math, weight: 1.0}, {name: format, weight: 0.1}]
        my_set: [{name: path/to/checks.py:my_check}]          # the calling style is read from its signature
        gsm8k: [{name: verl.utils.reward_score.gsm8k:compute_score}]
        judged: [{url: http://127.0.0.1:8000/score}]         # a remote reward server (reward/remote.py)

A sample's reward is the weighted sum of its source's verifier scores. Its `accuracy` is the score
of the first verifier that is not `format` (the correctness check); `format` is reported apart.
"""
from __future__ import annotations

import dataclasses
import math
import urllib.parse
from typing import Any, ClassVar, Dict, Iterable, List, Mapping

from home_rl.errors import ConfigError
from home_rl.resources import Resources, resources_field
from reward.registry import label_of
from reward.styles import STYLES


@dataclasses.dataclass
class VerifierEntry:
    name: str = ""  # registered name (math, vqa, ocr, format, choice), entry-point name, path/to/file.py:function or package.module:function
    weight: float = 1.0  # weight of this verifier's score in the sample's reward
    style: str = ""  # calling convention: home | verl | trl | openrlhf | easyr1 ("": read from the function's signature)
    url: str = ""  # instead of a name: a reward server, http://HOST:PORT/PATH (one JSON POST per chunk, see reward/remote.py)


def entry_key(entry: VerifierEntry) -> str:
    """What a verifier entry calls: its spec or URL, and the style when one is given (one sandbox verifier per key)."""
    target = entry.url or entry.name
    return f"{target} [{entry.style}]" if entry.style else target


def entry_label(entry: VerifierEntry) -> str:
    """Short name in results and metric keys: the function name of an import spec, `remote@HOST:PORT` for a URL."""
    if entry.url:
        return "remote@" + (urllib.parse.urlsplit(entry.url).netloc or entry.url)
    return label_of(entry.name)


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
    timeout_s: float = 5.0  # hard limit per sample and verifier (batched verifiers: per sample in the call; a remote server: per request); past it the sample scores 0
    max_failure_rate: float = 0.5  # a scoring batch (a GRPO step) in which one verifier fails on more than this share of its samples stops the run (HomeRLError); 1.0 never stops
    percent_as_fraction: bool = False  # math: a percentage also reads as a fraction (50\% matches 0.5, and still 50)
    ocr_metric: str = "exact"  # ocr: exact (normalised exact match) | anls (edit-distance similarity)
    anls_threshold: float = 0.5  # ocr with anls: similarities below this score 0
    sources: Dict[str, List[VerifierEntry]] = dataclasses.field(default_factory=default_sources)  # data_source -> weighted verifiers

    CHOICES: ClassVar[dict] = {"ocr_metric": ("exact", "anls")}

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
    """A VerifierEntry from an entry or a {name | url, weight, style} mapping."""
    if isinstance(value, VerifierEntry):
        return value
    expected = "{name: ..., weight: ..., style: ...} or {url: http://..., weight: ...}"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(VerifierEntry)})
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; expected {expected}")
    for field in ("name", "style", "url"):
        if not isinstance(value.get(field, ""), str):
            raise ConfigError(f"bad value for '{key}.{field}': {value[field]!r}; expected a string")
    try:
        weight = float(value.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(f"bad value for '{key}.weight': {value.get('weight')!r}; expected float") from None
    entry = VerifierEntry(value.get("name", ""), weight, value.get("style", ""), value.get("url", ""))
    check_entry(entry, key)
    return entry


def check_entry(entry: VerifierEntry, key: str) -> None:
    """ConfigError unless the entry names exactly one of a function and a URL, with a known style."""
    if bool(entry.name) == bool(entry.url):
        raise ConfigError(f"{key}: give either a name (a verifier) or a url (a reward server), not "
                          f"{'both' if entry.name else 'neither'}")
    if entry.url and not entry.url.startswith(("http://", "https://")):
        raise ConfigError(f"bad value for '{key}.url': {entry.url!r}; expected http://HOST:PORT/PATH")
    if entry.url and entry.style:
        raise ConfigError(f"{key}: a url entry has no style (the request body is fixed: see reward/remote.py)")
    if entry.style and entry.style not in STYLES:
        raise ConfigError(f"bad value for '{key}.style': {entry.style!r}; expected one of {', '.join(STYLES)}")


def check_reward_config(cfg: RewardConfig) -> None:
    """Raise ConfigError for values that cannot work (names the key)."""
    if cfg.num_workers < 1:
        raise ConfigError(f"reward.num_workers must be at least 1, got {cfg.num_workers}")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"reward.timeout_s must be positive, got {cfg.timeout_s}")
    if not 0 <= cfg.max_failure_rate <= 1:
        raise ConfigError(f"reward.max_failure_rate must be between 0 and 1, got {cfg.max_failure_rate}")
    if not cfg.sources:
        raise ConfigError("reward.sources is empty: map each data_source to a list of verifiers")
    for source, entries in cfg.sources.items():
        if not entries:
            raise ConfigError(f"reward.sources.{source} has no verifiers")
        labels = [entry_label(e) for e in entries]
        for i, entry in enumerate(entries):
            check_entry(entry, f"reward.sources.{source}.{i}")
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
