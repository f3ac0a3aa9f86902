"""User-facing errors: bad input that a person can fix (a path, a config key, a data row).

Recipes catch `HomeRLError` at the top and print its message as one line instead of a traceback;
anything else is a bug in home-rl and keeps its traceback.
"""


class HomeRLError(Exception):
    """An error in what the user gave us: the message says what and where."""


class ConfigError(HomeRLError):
    """A config key, type or value that is not valid."""


class ModelError(HomeRLError):
    """A model folder that cannot be used: missing, unsupported architecture, missing tensors."""
