"""The shared entry point of every recipe: config loading, logging, and one-line user errors."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Optional, TypeVar

from home_rl.config import load_config
from home_rl.errors import HomeRLError

T = TypeVar("T")


def run_recipe(main: Callable[[T], Any], schema: type[T], argv: Optional[list[str]] = None) -> Any:
    """Parse the config for `schema`, call `main(cfg)`; bad input ends in one line on stderr, exit code 2.

    Set HOME_RL_TRACEBACK=1 to get the full traceback of a user error as well.
    """
    logging.basicConfig(level=os.environ.get("HOME_RL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # `ray job stop` and schedulers send SIGTERM: exit through the `finally` blocks, which kill this
    # run's actors, instead of dying at once and leaving actors (and their engines) to linger.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cfg = load_config(schema, argv)
        return main(cfg)
    except HomeRLError as e:
        if os.environ.get("HOME_RL_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
