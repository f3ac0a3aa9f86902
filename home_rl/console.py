"""What a person sees while a recipe runs, and where the rest goes.

`trainer.console=quiet` (the default): the console shows one line per start-up phase with its time
("rollout: 1 vLLM worker ready (19.0 s)"), the progress bar, the logged steps, home-rl's own
warnings, and errors as one line naming the log file that holds the traceback. Everything else
goes to files under output_dir/logs/: the driver's library logging to driver.log, and each actor's
whole stdout and stderr (vLLM, DeepSpeed, Ray, transformers, C-level output too) to its own file
(learner-0.log, rollout-0.log, reward-0.log, home-model.log). `trainer.console=full` (or
HOME_RL_CONSOLE=full) prints everything to the console as before.

    log_dir = setup(cfg.output_dir, "quiet")       # the driver, once its config is known (home_rl/cli.py)
    env = {**env, **actor_env()}                    # an actor group's runtime_env env_vars
    capture_output(f"learner-{rank}")               # the first line of an actor's __init__
    phase_done("learners", "2 ready", start)        # "learners: 2 ready (16.0 s)"
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

LOG_DIR_ENV = "HOME_RL_LOG_DIR"  # the run's logs folder, handed to each actor through its runtime_env
MODES = ("quiet", "full")
# The driver's own state: set by setup(), read by actor_env() and ensure_ray (log_to_driver).
_state: dict = {"mode": None, "log_dir": None}
_traceback_log = logging.getLogger("home_rl.console.traceback")  # to driver.log only (propagate off)


def setup(output_dir: Optional[str], mode: str = "quiet") -> Optional[Path]:
    """Configure the driver's logging; returns the logs folder (None in full mode or without output_dir)."""
    mode = os.environ.get("HOME_RL_CONSOLE") or mode
    if mode not in MODES:
        from home_rl.errors import ConfigError

        raise ConfigError(f"console mode must be one of {', '.join(MODES)}, got {mode!r}")
    level = os.environ.get("HOME_RL_LOG_LEVEL", "INFO")
    _state["mode"] = mode
    if mode == "full" or not output_dir:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        return None
    folder = Path(output_dir).resolve() / "logs"  # absolute: actors run in other working folders
    folder.mkdir(parents=True, exist_ok=True)
    driver_log = folder / "driver.log"
    to_file = logging.FileHandler(driver_log, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = _ConsoleHandler()
    to_console.setFormatter(_ConsoleFormatter(driver_log))
    to_console.addFilter(_for_console)
    root = logging.getLogger()
    root.setLevel(level)
    root.handlers = [to_file, to_console]
    logging.captureWarnings(True)  # libraries' FutureWarnings and the like: driver.log, not the console
    with contextlib.suppress(ImportError):  # transformers' "Loading weights" bars (the cold start's upcycle)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    _traceback_log.handlers, _traceback_log.propagate = [to_file], False
    _state["log_dir"] = folder
    return folder


def mode() -> Optional[str]:
    """quiet | full once setup() ran in this process; None otherwise (library use, tests)."""
    return _state["mode"]


def log_dir() -> Optional[Path]:
    return _state["log_dir"]


def actor_env() -> dict[str, str]:
    """The env var that tells an actor where its log file goes (empty unless the driver is quiet)."""
    return {LOG_DIR_ENV: str(_state["log_dir"])} if _state["log_dir"] else {}


def capture_output(name: str) -> Optional[Path]:
    """Send this actor process's stdout and stderr to LOG_DIR/name.log (nothing when LOG_DIR_ENV is unset).

    The file descriptors themselves are redirected (os.dup2), so vLLM's and DeepSpeed's C-level
    output and any subprocess started later (vLLM engine cores, reward sandboxes) land there too.
    The file is appended to, under a header with the pid: a restarted actor adds to the same file, and
    the driver finds the file of a failed actor by the pid that Ray's error names (actor_log_of).
    home-rl's own warnings also go to the stderr Ray gave the process, which Ray shows on the driver's
    console as "(LearnerWorker pid=...) warning: ..." (ensure_ray turns log_to_driver on for recipes).
    """
    folder = os.environ.get(LOG_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    to_ray = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    header = f"==== home-rl {name}: pid {os.getpid()} on {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    os.write(fd, header.encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Ray leaves the root logger of a worker bare: give home-rl's own lines in this actor a time stamp
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings = logging.StreamHandler(to_ray)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(_ConsoleFormatter(path, stamp=False))  # Ray's prefix names the actor; a traceback is in its file
    warnings.addFilter(_home_rl_only)
    logging.getLogger().addHandler(warnings)
    return path


@contextlib.contextmanager
def output_to(name: str) -> Iterator[Optional[Path]]:
    """Inside the block, this process's stdout and stderr go to LOG_DIR/name.log (quiet mode with a log folder;
    else nothing changes): processes started inside (vLLM engine cores) keep writing there for good."""
    folder = _state["log_dir"]
    if folder is None:
        yield None
        return
    path = folder / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def phase_done(name: str, what: str, since: float) -> None:
    """The console line of a finished start-up phase: "name: what (seconds since `since`)"."""
    log.info("%s: %s (%.1f s)", name, what, time.perf_counter() - since)


def describe_failure(error: BaseException) -> str:
    """One line for a run that failed: the cause, and the log files that hold the traceback and the output.

    Writes the full traceback (for an actor's error, its remote traceback too) to driver.log.
    """
    _traceback_log.error("the run failed", exc_info=error)
    where = []
    if _state["log_dir"]:
        actor_log = actor_log_of(error)
        if actor_log is not None:
            where.append(f"in {actor_log.stem}, its output: {actor_log}")
        where.append(f"traceback: {_state['log_dir'] / 'driver.log'}")
    return f"{cause_of(error)} ({'; '.join(where)})" if where else cause_of(error)


def cause_of(error: BaseException, limit: int = 400) -> str:
    """The cause in one line, "Type: message": an actor's own exception rather than Ray's wrapper."""
    ray_exceptions = getattr(sys.modules.get("ray"), "exceptions", None)
    while ray_exceptions and isinstance(error, ray_exceptions.RayTaskError) and error.cause is not None \
            and error.cause is not error:
        error = error.cause
    lines = str(error).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    if ray_exceptions and isinstance(error, ray_exceptions.RayActorError) and frames:
        # an actor whose __init__ raised: Ray keeps only the text, the remote traceback; its exception
        # is what follows the last frame (after that frame's indented code lines)
        rest = lines[frames[-1] + 1:]
        while rest and rest[0][:1].isspace():
            rest = rest[1:]
        text = " ".join(line.strip() for line in rest if line.strip())
        text = re.sub(r"^[\w.]+\.(\w+:)", r"\1", text)  # pydantic_core._pydantic_core.ValidationError: -> ValidationError:
    elif ray_exceptions and isinstance(error, ray_exceptions.RayActorError):
        # a process that died: the last line says how ("The actor is dead because its worker process has died ...")
        text = f"{type(error).__name__}: {next((line.strip() for line in reversed(lines) if line.strip()), '')}"
    else:
        message = " ".join(line.strip() for line in lines if line.strip())
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def actor_log_of(error: BaseException) -> Optional[Path]:
    """The log file of the actor process that Ray's error names by pid ("pid=1234" / "pid: 1234")."""
    folder = _state["log_dir"]
    found = re.search(r"\bpid[=:]\s*(\d+)", str(error))
    if folder is None or found is None:
        return None
    header = f": pid {found.group(1)} on "
    for path in sorted(folder.glob("*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            if any(line.startswith("==== home-rl ") and header in line for line in f):
                return path
    return None


def _home_rl_only(record: logging.LogRecord) -> bool:
    return record.name.startswith(("home_rl", "reward", "data_pipelines", "__main__"))


def _for_console(record: logging.LogRecord) -> bool:
    # home-rl's own INFO lines and up; from libraries only errors (their warnings are in driver.log)
    return _home_rl_only(record) or record.levelno >= logging.ERROR


class _ConsoleFormatter(logging.Formatter):
    """"HH:MM:SS message"; warnings and errors say so; a traceback stays in the log file, named on the line."""

    def __init__(self, traceback_log: Path, stamp: bool = True):
        super().__init__(datefmt="%H:%M:%S")
        self.traceback_log, self.stamp = traceback_log, stamp

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        if record.exc_info:
            message += f" (traceback: {self.traceback_log})"
        return f"{self.formatTime(record, self.datefmt)} {message}" if self.stamp else message


class _ConsoleHandler(logging.StreamHandler):
    """stderr, through tqdm.write when tqdm is there, so that a log line does not break the progress bar."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  logging must never raise into the run
            self.handleError(record)
