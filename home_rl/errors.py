"""User-facing errors: bad input that a person can fix (a path, a config key, a data row).

Recipes catch `HomeRLError` at the top and print its message as one line instead of a traceback;
anything else is a bug in home-rl and keeps its traceback.
"""
from __future__ import annotations

from typing import Any


class HomeRLError(Exception):
    """An error in what the user gave us: the message says what and where."""


class ConfigError(HomeRLError):
    """A config key, type or value that is not valid."""


class ModelError(HomeRLError):
    """A model folder that cannot be used: missing, unsupported architecture, missing tensors."""


def ray_get(refs: Any) -> Any:
    """ray.get, with a user error raised inside an actor (bad config, prompt, model, weights) re-raised as itself,
    so that it reaches the recipe's one-line report instead of a wrapped actor traceback."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, HomeRLError):
            raise cause from None
        raise
