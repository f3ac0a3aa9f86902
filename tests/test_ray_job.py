"""The README's `ray start` + `ray job submit` lines work as written, and `ray job stop` leaves nothing behind.

The lines are read from README.md ("The main job") and run by bash in a user's environment: the venv on
PATH, none of the variables this test session sets for itself (tests/conftest.py sets RAY_AUTH_MODE=disabled,
which would hide Ray 2.60's token authentication). What differs from the README: this cluster's own ports
and temp dir (the test session's local Ray and other runtimes on the machine hold the defaults), and
overrides appended to the job's arguments that make it a tiny model's few-minute run.
"""
from __future__ import annotations

import json

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README_ADDRESS = "http://127.0.0.1:8265"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT, AGENT_GRPC_PORT = (free_port() for _ in range(5))
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


def readme_cluster_commands() -> list[str]:
    """The commands of the README's `ray start` block under "The main job": one per logical line
    (continuations joined), trailing comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text.split("### The main job", 1)[1].split("\n### ", 1)[0]
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "ray start" in b]
    assert len(blocks) == 1, "README.md's 'The main job' needs exactly one bash block with `ray start`"
    joined = re.sub(r"\\\n\s*", "", blocks[0])
    commands = [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
    return [c for c in commands if c and not c.startswith("#")]


def test_the_cluster_guide_carries_the_same_lines():
    block = "\n".join(readme_cluster_commands())
    guide = (REPO / "cluster/README.md").read_text()
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in re.sub(r"\\\n\s*", "", guide).splitlines()]
    assert block in "\n".join(lines), "cluster/README.md's one-machine lines differ from README.md's"


def user_env() -> dict[str, str]:
    """What a user's shell has: the venv on PATH, and none of the variables the test session sets for itself."""
    test_only = ("RAY_", "VLLM_", "PYTEST_")  # RAY_AUTH_MODE, RAY_ADDRESS, VLLM_* from conftest.py, pytest's own
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(test_only) and k not in ("TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def for_this_test(commands: list[str], temp_dir: str, job_args: list[str]) -> list[str]:
    """The README's commands with this cluster's ports and temp dir, and `job_args` after the job's own."""
    out = []
    for command in commands:
        if command.startswith("ray start --head"):
            command += (f" --port={GCS_PORT} --dashboard-port={DASHBOARD_PORT} --ray-client-server-port={CLIENT_PORT}"
                        f" --dashboard-agent-listen-port={AGENT_PORT} --dashboard-agent-grpc-port={AGENT_GRPC_PORT}"
                        f" --temp-dir={temp_dir}")
        elif command.startswith("ray job submit"):
            assert README_ADDRESS in command and "python recipes/grpo_think.py" in command, command
            command = command.replace(README_ADDRESS, ADDRESS) + " " + shlex.join(job_args)
        out.append(command)
    return out


def bash(commands: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `commands` as one bash script (stopping at the first that fails), from the repository root."""
    return subprocess.run(["bash", "-e", "-c", "\n".join(commands)], capture_output=True, text=True,
                          env=user_env(), cwd=REPO, timeout=timeout)


def submit(commands: list[str], exports: list[str]) -> subprocess.CompletedProcess:
    """Run the README's block; while the head has no job agent yet (it registers late on a busy machine),
    run the submit line again, as the README says."""
    done = bash(commands)
    deadline = time.time() + 300
    submit_line = [c for c in commands if c.startswith("ray job submit")]
    while "No available agent" in done.stdout + done.stderr and time.time() < deadline:
        time.sleep(3)
        done = bash(exports + submit_line)
    return done


def actor_processes(temp_dir: str) -> list[str]:
    """Learner/rollout/reward actor processes of the cluster started with `temp_dir` (its raylet's descendants)."""
    rows = [line.split(None, 2) for line in subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="],
                                                            capture_output=True, text=True).stdout.splitlines()]
    rows = [(int(r[0]), int(r[1]), r[2] if len(r) > 2 else "") for r in rows]
    ours = {pid for pid, _, args in rows if temp_dir in args}
    grew = True
    while grew:  # add children until nothing new: Ray's workers are the raylet's children
        new = {pid for pid, ppid, _ in rows if ppid in ours and pid not in ours}
        ours |= new
        grew = bool(new)
    names = ("ray::LearnerWorker", "ray::RolloutWorker", "ray::RewardWorker")
    return [args for pid, _, args in rows if pid in ours and args.startswith(names)]


def stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster this test started (`ray stop` would stop every Ray cluster on the machine,
    the test session's own included): its processes carry its temp dir or its GCS port in their command
    lines (the Ray client server has only the port), and its workers exit when their raylet does."""
    import signal

    mine = re.compile(re.escape(temp_dir) + rf"|:{GCS_PORT}\b")

    def ours() -> list[int]:
        # -ww: whole command lines, whatever COLUMNS says (the temp dir comes after long paths)
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        return [int(line.split(None, 1)[0]) for line in ps.splitlines() if mine.search(line)]

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while ours() and time.time() < deadline:
            time.sleep(0.5)
    assert not ours(), "processes of the test's Ray cluster outlived SIGKILL"


@pytest.fixture()
def temp_dir():
    """The test cluster's --temp-dir; whatever the test started there is stopped at the end, pass or fail."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    try:
        yield temp
    finally:
        stop_cluster(temp)


def test_the_readme_lines_run_the_main_job_and_ray_job_stop_ends_it(temp_dir, tiny_home, tmp_path):
    readme = readme_cluster_commands()
    assert any(c.startswith("ray start --head") for c in readme) and any(c.startswith("ray job submit") for c in readme)
    exports = [c for c in readme if c.startswith("export ")]
    home = tiny_home("qwen2")
    # a tiny model's run; learners, rollout and reward workers keep the default job's counts, so the
    # README's `--num-cpus` is checked against what the default job asks for
    tiny = [f"model.path={home}", "model.dtype=float32", f"output_dir={tmp_path / 'run'}", "synthetic_rows=16",
            "data.prompts_per_step=4", "rollout.n=2", "rollout.max_response_tokens=8", "rollout.dtype=float32",
            "rollout.kv_cache_gib=0.5", "rollout.max_model_len=768", "data.max_prompt_tokens=512", "eval.rows=4"]
    job = submit(for_this_test(readme, temp_dir, tiny), exports)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "final HOME checkpoint" in job.stdout
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # the learnability check, then the README's total_steps=2

    # a second job, submitted the README's way and stopped while it runs: its actors must go away with it
    # asynchronous: stopped while the rollout thread works ahead of the learners
    longer = tiny + ["trainer.total_steps=50", "trainer.max_staleness=1", f"output_dir={tmp_path / 'run2'}"]
    second = [c.replace("ray job submit", "ray job submit --submission-id=grpo-stop --no-wait", 1)
              for c in for_this_test(readme, temp_dir, longer) if c.startswith("ray job submit")]
    started = bash(exports + second)
    assert started.returncode == 0, (started.stdout + started.stderr)[-2000:]
    kinds = ("ray::LearnerWorker", "ray::RolloutWorker", "ray::RewardWorker")

    def running() -> set[str]:
        return {kind for kind in kinds for args in actor_processes(temp_dir) if args.startswith(kind)}

    # every kind of actor up is enough (waiting for a training step took over 4 min on a loaded machine)
    deadline = time.time() + 480
    while time.time() < deadline and running() != set(kinds):
        time.sleep(2)
    assert running() == set(kinds), f"the second job started only {sorted(running())}"
    stopped = bash(exports + [f"ray job stop --address={ADDRESS} grpo-stop"])
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    deadline = time.time() + 90
    while time.time() < deadline and actor_processes(temp_dir):
        time.sleep(2)
    assert actor_processes(temp_dir) == []
