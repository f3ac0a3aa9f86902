"""The shared entry point of every recipe: config loading, logging, and one-line user errors."""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Optional, TypeVar

from home_rl import console
from home_rl.config import load_config
from home_rl.errors import HomeRLError

T = TypeVar("T")


def run_recipe(main: Callable[[T], Any], schema: type[T], argv: Optional[list[str]] = None) -> Any:
    """Parse the config for `schema`, call `main(cfg)`; bad input ends in one line on stderr, exit code 2.

    Set HOME_RL_TRACEBACK=1 to get the full traceback of a user error as well. The console is quiet
    unless `trainer.console=full` (or HOME_RL_CONSOLE=full): see home_rl/console.py; any other
    failure then ends in one line naming the log files, exit code 1.
    """
    # `ray job stop` and schedulers send SIGTERM: exit through the `finally` blocks, which kill this
    # run's actors, instead of dying at once and leaving actors (and their engines) to linger.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cfg = load_config(schema, argv)
        # every recipe config has output_dir; recipes without a trainer section are quiet
        console.setup(getattr(cfg, "output_dir", None), getattr(getattr(cfg, "trainer", None), "console", "quiet"))
        return main(cfg)
    except HomeRLError as e:
        if os.environ.get("HOME_RL_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        if console.log_dir() is None or os.environ.get("HOME_RL_TRACEBACK"):
            raise
        print(f"error: {console.describe_failure(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
