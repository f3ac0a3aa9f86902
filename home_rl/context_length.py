"""Token lengths that fit the model: the one rule every recipe applies to its length keys.

A recipe's config names its length budgets as it resolves (at load, so that config.yaml and --help
show what runs):

    sft          data.max_prompt_tokens + sft.max_response_tokens <= the model's context
    serve        engine.max_model_len <= the model's context;  engine.max_tokens <= engine.max_model_len
    grpo_think,  rollout.max_model_len <= the model's context;
    train_router data.max_prompt_tokens + rollout.max_response_tokens <= rollout.max_model_len
    evaluate     (with rollout.on_long_prompt=truncate|skip: rollout.max_response_tokens < rollout.max_model_len)

The rule, per budget: when its keys add up to more than the limit, the keys the user did not set
(in a --config file or on the command line: `given`, recorded by home_rl.config.load_config) are
lowered in proportion to their values until they fit beside the keys the user set (on a 512-token
model, SFT's defaults 1024 + 512 become 341 + 170); when the keys the user set leave no room, that is
a ConfigError naming them. A config built in code has no given keys: all its lengths are fitted.

The model's context is `max_position_embeddings` in its config.json (the language model's part of a
vision-language model). Where that file cannot be read yet (an embedded model not converted yet, a
checkpoint still to be trained) the lengths stay as they are, and the start-up checks that read the
model (the memory plan, vLLM) still refuse what does not fit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from home_rl.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limit:
    tokens: int  # what the keys may add up to
    text: str  # how an error names it ("the model's context of 512 tokens (...)", "rollout.max_model_len=512")


def model_context(model_path: str) -> Optional[Limit]:
    """The context of the model at `model_path` (a folder, or an embedded model's name), None where its
    config.json cannot be read yet."""
    if not model_path:
        return None
    folder = Path(model_path)
    if not (folder / "config.json").is_file() and "/" not in model_path:
        # an embedded model's converted folder; every model derived from it (cold start, HOME) shares its context.
        # Not home_rl.model.embedded.cache_dir: importing the model package (transformers) takes seconds.
        folder = Path(os.environ.get("HOME_RL_CACHE", Path.home() / ".cache" / "home_rl")) / "models" / model_path
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = raw.get("text_config") or {}
    context = text.get("max_position_embeddings") or raw.get("max_position_embeddings")
    if not isinstance(context, int) or context < 1:
        return None
    return Limit(context, f"the model's context of {context} tokens (max_position_embeddings in {folder}/config.json)")


def key_limit(cfg: Any, key: str, less: int = 0, why: str = "") -> Limit:
    """The value of `key` in `cfg` as a limit (less `less` tokens, `why` saying what for)."""
    return Limit(_get(cfg, key) - less, f"{key}={_get(cfg, key)}{why}")


def fit_lengths(cfg: Any, keys: Sequence[str], limit: Optional[Limit], given: frozenset[str], hint: str = "") -> None:
    """Make the values of `keys` (dotted, in `cfg`) add up to at most `limit` (None: unknown, nothing to do):
    lower the keys not in `given` in proportion, or raise a ConfigError naming the given ones that leave no
    room (`hint`: another way out, appended to the error)."""
    values = {k: _get(cfg, k) for k in keys}
    if limit is None or sum(values.values()) <= limit.tokens:
        return
    mine = [k for k in keys if k in given]
    free = [k for k in keys if k not in given]
    fixed = sum(values[k] for k in mine)
    room = limit.tokens - fixed
    if room < len(free) or not free:  # every lowered key keeps at least one token
        shown = " + ".join(f"{k}={values[k]}" for k in mine) + (f" = {fixed}" if len(mine) > 1 else "")
        what = f"is above {limit.text}" if fixed > limit.tokens else \
            f"leaves no room for {' and '.join(free)} within {limit.text}"
        raise ConfigError(f"{shown} {what}: lower {' or '.join(mine)}{hint}")
    total = sum(values[k] for k in free)
    lowered = {k: max(1, values[k] * room // total) for k in free}
    while sum(lowered.values()) > room:  # only where max(1, ...) rounded a share up
        lowered[max(lowered, key=lowered.get)] -= 1
    for k, v in lowered.items():
        _set(cfg, k, v)
    log.info("lengths fitted to %s: %s", limit.text, ", ".join(f"{k} {values[k]} -> {v}" for k, v in lowered.items()))


def fit_rollout_lengths(cfg: Any, model_path: str, given: frozenset[str]) -> None:
    """The budgets of a recipe with a `rollout` and a `data` section (grpo_think, train_router, evaluate)."""
    fit_lengths(cfg, ["rollout.max_model_len"], model_context(model_path), given)
    if cfg.rollout.on_long_prompt == "error":  # every prompt must fit whole beside a whole response
        fit_lengths(cfg, ["data.max_prompt_tokens", "rollout.max_response_tokens"],
                    key_limit(cfg, "rollout.max_model_len"), given,
                    ", raise rollout.max_model_len, or set rollout.on_long_prompt=truncate|skip")
    else:  # long prompts are cut or skipped: a response still needs one prompt token beside it
        fit_lengths(cfg, ["rollout.max_response_tokens"],
                    key_limit(cfg, "rollout.max_model_len", 1, " less a prompt token"), given)


def _get(cfg: Any, key: str) -> int:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, key: str, value: int) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)
