"""A child process that runs verifier calls, with a hard time limit on each call.

A Python thread cannot be stopped, and math-verify's own limits use signal.alarm, which only works
on a main thread; so verifiers run in a separate process that is killed when a call overruns.
A whole chunk of calls is sent at once and the results stream back one unit at a time, so the
parent knows which call hung. A killed child is replaced by a spare started in advance, so a
timeout costs the time limit and not a Python start-up on top.

Protocol over one socket pair (pickled messages):
    parent -> child   setup {"sys_path", "verifiers": {key: ref}}, then lists of units; a unit is a list of
                      calls (verifier key, [cleaned sample, ...], limit_s): one call, or several `async def`
                      calls that run concurrently, each with its own limit
    child -> parent   ("ready",), then for each unit one list of outcomes per call, one outcome per sample:
                      ("ok", score, extras) | ("exception", message) | ("timeout", message)
"""
from __future__ import annotations

import asyncio
import inspect
import math
import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from reward.styles import arguments, per_sample

Call = tuple  # (verifier key, [cleaned sample, ...], limit_s)
Outcome = tuple  # ("ok", score, extras) | ("exception", message) | ("timeout", message)

_CHILD_MAIN = "import sys; from reward.sandbox import child_main; child_main(int(sys.argv[1]), int(sys.argv[2]))"
_MAX_MESSAGE = 2000
KILL_GRACE_S = 0.25  # past a call's limit, the parent kills the child: a remote or async call reports its own timeout first


class Sandbox:
    """Runs calls in a child process; `run` returns one list of outcomes per call, in order."""

    def __init__(self, setup: dict, startup_timeout_s: float = 120.0):
        self.setup = setup
        self.startup_timeout_s = startup_timeout_s
        self._child = _Child.start(setup)
        self._spare = _Child.start(setup)
        self._child.wait_ready(startup_timeout_s)

    def run(self, units: list[list[Call]]) -> list[list[list[Outcome]]]:
        """Per unit, per call, one outcome per sample; a unit whose child overruns is all timeouts."""
        outcomes: list[list[list[Outcome]]] = []
        while len(outcomes) < len(units):
            self._child.wait_ready(self.startup_timeout_s)
            pending = units[len(outcomes):]
            try:
                self._child.conn.send(pending)
            except OSError:  # it died between runs: replace it and send again
                self._replace()
                continue
            for unit in pending:
                limit = max(call[2] for call in unit)
                try:
                    ready = self._child.conn.poll(limit + KILL_GRACE_S)
                    result = self._child.conn.recv() if ready else None
                except (EOFError, OSError):
                    code = self._child.proc.poll()
                    outcomes.append([[("exception", f"verifier process died (exit code {code})")] * len(items)
                                     for _, items, _ in unit])
                    self._replace()
                    break
                if result is None:
                    outcomes.append([[("timeout", f"no result within {limit:g} s")] * len(items) for _, items, _ in unit])
                    self._replace()
                    break
                outcomes.append(result)
        return outcomes

    def close(self) -> None:
        for child in (self._child, self._spare):
            child.kill()

    def _replace(self) -> None:
        self._child.kill()
        self._child, self._spare = self._spare, _Child.start(self.setup)


class _Child:
    def __init__(self, proc: subprocess.Popen, conn: Connection):
        self.proc, self.conn, self.ready = proc, conn, False

    @classmethod
    def start(cls, setup: dict) -> "_Child":
        ours, theirs = socket.socketpair()
        # A new session, so that kill() also ends any process the verifier started.
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno()), str(os.getpid())],
                                pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL,
                                env=_child_env())
        theirs.close()
        child = cls(proc, Connection(ours.detach()))
        child.conn.send(setup)
        return child

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            message = self.conn.recv() if self.conn.poll(timeout_s) else None
        except (EOFError, OSError):
            message = None
        if message != ("ready",):
            code = self.proc.poll()
            self.kill()
            raise RuntimeError(f"reward sandbox process did not start (exit code {code}, got {message!r}); "
                               f"its stderr is in this worker's log")
        self.ready = True

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.conn.close()


def _child_env() -> dict:
    """This environment, with the folder holding this `reward` package first on the import path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ----------------------------------------------------------------------------- the child side


def child_main(fd: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    conn = Connection(fd)
    setup = conn.recv()
    # The driver's import path: modules of pickled verifiers and entry-point folders live there.
    sys.path.extend(p for p in setup["sys_path"] if p not in sys.path)
    verifiers = {key: _load(ref) for key, ref in setup["verifiers"].items()}
    conn.send(("ready",))
    while True:
        try:
            units = conn.recv()
        except EOFError:
            return
        for unit in units:
            if any(_is_async(verifiers[key]) for key, _, _ in unit):
                conn.send(asyncio.run(_gather([(verifiers[key], items, limit) for key, items, limit in unit])))
            else:
                conn.send([_run_call(verifiers[key], items, limit) for key, items, limit in unit])


def _load(ref: dict) -> Any:
    """(callable, options, convention) for one verifier, or the error that loading it raised."""
    try:
        if ref["url"]:  # a remote reward: the sandbox posts to it (reward/remote.py)
            return ref["url"], {}, ref["convention"]
        if ref["pickled"] is not None:
            import cloudpickle
            fn = cloudpickle.loads(ref["pickled"])
        else:
            from reward.registry import get_verifier
            fn = get_verifier(ref["spec"])
        if callable(getattr(fn, "warm_up", None)):  # one-time costs before any call is timed
            fn.warm_up()
        return fn, ref["options"], ref["convention"]
    except BaseException as e:  # reported on every call of this verifier
        return _describe(e)


def _is_async(verifier: Any) -> bool:
    return not isinstance(verifier, str) and verifier[2].asynchronous


def _run_call(verifier: Any, items: list, limit_s: float) -> list[Outcome]:
    if isinstance(verifier, str):
        return [("exception", f"could not load the verifier here: {verifier}")] * len(items)
    fn, options, conv = verifier
    try:
        if conv.style == "remote":
            from reward.remote import post
            value = post(fn, items, limit_s)
        else:
            args, kwargs = arguments(conv, items, options)
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):  # an async __call__ the signature check did not see
                value = asyncio.run(_awaited(value))
        values = per_sample(conv, value, len(items))
    except TimeoutError as e:  # a remote server that did not answer in time
        return [("timeout", _describe(e))] * len(items)
    except BaseException as e:  # SystemExit too: a verifier must never end the worker
        return [("exception", _describe(e))] * len(items)
    return [_outcome(v) for v in values]


async def _awaited(value: Any) -> Any:
    return await value


async def _gather(calls: list[tuple]) -> list[list[Outcome]]:
    """A unit's calls concurrently (async verifiers), each within its own limit."""
    async def one(verifier: Any, items: list, limit_s: float) -> list[Outcome]:
        if isinstance(verifier, str) or not verifier[2].asynchronous:
            return _run_call(verifier, items, limit_s)
        fn, options, conv = verifier
        try:
            args, kwargs = arguments(conv, items, options)
            value = await asyncio.wait_for(fn(*args, **kwargs), limit_s)
            values = per_sample(conv, value, len(items))
        except TimeoutError:
            return [("timeout", f"no result within {limit_s:g} s")] * len(items)
        except BaseException as e:
            return [("exception", _describe(e))] * len(items)
        return [_outcome(v) for v in values]

    return list(await asyncio.gather(*(one(*call) for call in calls)))


def _outcome(value: Any) -> Outcome:
    """("ok", score, extras) from a float/bool/dict result; an exception outcome if it is not one."""
    extras = {}
    if isinstance(value, dict):
        extras = {str(k): _loggable(v) for k, v in value.items() if k != "score"}
        value = value.get("score")
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return ("ok", float(value), extras)
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError(value)
        score = float(value)  # numpy and torch scalars
    except (TypeError, ValueError):
        return ("exception", f"TypeError: the verifier returned {_short(repr(value))}, not a number or a dict with 'score'")
    if not math.isfinite(score):
        return ("exception", f"ValueError: the verifier returned a non-finite score {score}")
    return ("ok", score, extras)


def _loggable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _short(value if isinstance(value, str) else repr(value))


def _describe(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return _short(f"{type(e).__name__}: {e}") + where


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies, so a hung verifier cannot outlive a worker."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
