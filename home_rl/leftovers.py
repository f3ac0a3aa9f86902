"""Processes that dead local Ray runtimes left behind, found and ended before a new local runtime starts.

When the driver of a local runtime is SIGKILLed (the OOM killer does this), Ray's gcs_server and
raylet die with it (they are tied to the driver's life), and the raylet's workers with them, but
`ray::DashboardAgent` and `ray::RuntimeEnvAgent` live on with parent 1, ignore SIGTERM, and hold
memory (measured with Ray 2.60). Nothing else would ever end them.

Which session a process belongs to: its command line names the session folder (gcs_server, raylet,
dashboard, monitors), or its open files lie in it (the agents and workers keep their log files in
session_*/logs open; their command lines are only "ray::..."). That works for any Ray temp folder.

When a session is dead: none of its processes is a raylet or a gcs_server. Every live Ray runtime
has both (a head node) or at least a raylet (a node joining a head), for its whole life: they are
the first processes a runtime starts and the last to go, and an agent is a raylet's child. So the
pytest session's runtime, a `ray start` cluster, and other people's runs all keep theirs and are
never touched. A head starts its gcs_server first; a node joining a remote head starts its log
monitor a moment before its raylet, so a session counts as dead only when its youngest process is
older than MIN_AGE_S (the leftovers of a dead session are as old as it is). The pid in
a session's name is not used: for `ray start` it is the CLI process, which exits at once. Only
processes of Ray's own (a "ray::" or "ray-dashboard-" title, or a program inside the ray package) are ended, never a
driver, and only this user's (another user's files cannot be read, nor the process signalled).
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

SESSION = re.compile(r"/[^\s\x00]*/session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+(?=/|\s|$)")
_RAY_PROGRAM = re.compile(r"/(site|dist)-packages/ray/")
_LIFELINES = ("raylet", "gcs_server")  # a session with one of these alive is alive
MIN_AGE_S = 30.0  # a session whose youngest process is younger may still be starting


@dataclasses.dataclass(frozen=True)
class RayProcess:
    pid: int
    args: str  # the command line, NULs as spaces
    sessions: frozenset[str]  # session folders it names or has files open in
    age_s: float  # seconds since the process started

    @property
    def program(self) -> str:
        return os.path.basename(self.args.split(" ", 1)[0])

    @property
    def name(self) -> str:
        """"ray::DashboardAgent", "raylet", "log_monitor.py": what it is, for a person."""
        if self.args.startswith(("ray::", "ray-dashboard-")):
            return self.args.split(" ", 1)[0]
        script = next((a for a in self.args.split(" ")[1:3] if a.endswith(".py")), "")
        return os.path.basename(script) or self.program

    @property
    def is_ray_own(self) -> bool:
        return self.args.startswith(("ray::", "ray-dashboard-")) or any(_RAY_PROGRAM.search(a) for a in self.args.split(" ")[:3])


def session_processes() -> dict[str, list[RayProcess]]:
    """Every readable process that belongs to a Ray session, by session folder (Linux /proc; {} elsewhere)."""
    by_session: dict[str, list[RayProcess]] = defaultdict(list)
    for proc in _all_processes():
        for session in proc.sessions:
            by_session[session].append(proc)
    return dict(by_session)


def dead_sessions(sessions: dict[str, list[RayProcess]]) -> dict[str, list[RayProcess]]:
    """Of `sessions`, those with no raylet and no gcs_server left, with their remaining Ray processes."""
    return {session: [p for p in procs if p.is_ray_own] for session, procs in sessions.items()
            if not any(p.program in _LIFELINES for p in procs) and any(p.is_ray_own for p in procs)
            and min(p.age_s for p in procs) > MIN_AGE_S}


def end_dead_sessions(wait_s: float = 5.0) -> dict[str, list[RayProcess]]:
    """SIGKILL the processes of dead Ray sessions (SIGTERM is ignored by the agents, and a dead session
    has nothing left to save); returns what was ended, by session."""
    sessions = session_processes()
    dead = dead_sessions(sessions)
    live = set(sessions) - set(dead)
    ended: dict[str, list[RayProcess]] = {}
    for session, procs in dead.items():
        for p in procs:
            if p.sessions & live or _args_of(p.pid) != p.args:  # shared with a live session, or the pid was reused
                continue
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            ended.setdefault(session, []).append(p)
    deadline = time.time() + wait_s
    while time.time() < deadline and any(_alive(p.pid) for procs in ended.values() for p in procs):
        time.sleep(0.1)
    return ended


def describe(ended: dict[str, list[RayProcess]]) -> str:
    """"2 processes of 1 dead Ray session (ray::DashboardAgent, ray::RuntimeEnvAgent; session_...)"."""
    procs = [p for ps in ended.values() for p in ps]
    names = Counter(p.name for p in procs)
    listed = ", ".join(name if n == 1 else f"{name} x{n}" for name, n in sorted(names.items()))
    sessions = ", ".join(sorted(Path(s).name for s in ended))
    return (f"{len(procs)} process{'es' * (len(procs) != 1)} of {len(ended)} dead Ray session"
            f"{'s' * (len(ended) != 1)} ({listed}; {sessions})")


def _all_processes() -> list[RayProcess]:
    out = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except FileNotFoundError:  # no /proc (macOS): nothing to find
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        args = _args_of(pid)
        if not args:  # gone, a kernel thread, or a zombie
            continue
        places = [args]
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # another user's process, or it just ended: only its command line counts
            fds = []
        for fd in fds:
            try:
                places.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:  # closed meanwhile
                pass
        sessions = frozenset(m.group(0) for place in places for m in SESSION.finditer(place))
        if sessions:
            out.append(RayProcess(pid, args, sessions, _age_s(pid)))
    return out


def _args_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\x00", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _age_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:  # field 22, after the parenthesised name: start time in clock ticks
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, IndexError, ValueError):
        return 0.0  # unknown: counts as young, so its session is left alone


def _alive(pid: int) -> bool:
    return bool(_args_of(pid))  # a zombie's cmdline is empty: killed, waiting for init to reap it
