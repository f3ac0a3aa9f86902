"""`ray start --head` + `ray job submit ... recipes/grpo_think.py` works, and `ray job stop` leaves nothing behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Own ports for this test's cluster: the test session's local Ray runtime holds the default ones.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT, AGENT_GRPC_PORT = (free_port() for _ in range(5))
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


def ray_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def submit_with_retry(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Submit; while the head reports no job agent yet (it registers late on a busy machine), try again."""
    deadline = time.time() + 300
    while True:
        job = ray_cli("job", "submit", f"--address={ADDRESS}", "--working-dir=.", *args, env=env, timeout=600)
        if "No available agent" not in job.stderr or time.time() > deadline:
            return job
        time.sleep(3)


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


@pytest.fixture()
def ray_head():
    import tempfile

    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    started = ray_cli("start", "--head", "--num-cpus=8", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                      f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={CLIENT_PORT}",
                      f"--dashboard-agent-listen-port={AGENT_PORT}", f"--dashboard-agent-grpc-port={AGENT_GRPC_PORT}",
                      f"--temp-dir={temp}", "--disable-usage-stats", env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        deadline = time.time() + 120  # the job agent comes up some seconds after `ray start` returns
        while ray_cli("job", "list", f"--address={ADDRESS}", env=env).returncode != 0 and time.time() < deadline:
            time.sleep(2)
        yield env, temp
    finally:
        stop_cluster(temp)


def stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster this test started (`ray stop` would stop every Ray cluster on the machine,
    the test session's own included): its processes carry its temp dir or its GCS port in their command
    lines (the Ray client server has only the port), and its workers exit when their raylet does."""
    import re
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


def test_ray_job_submit_runs_the_main_job(ray_head, tiny_home, tmp_path):
    ray_head, temp = ray_head
    home = tiny_home("qwen2")
    args = [f"model.path={home}", "model.dtype=float32", f"output_dir={tmp_path / 'run'}", "trainer.total_steps=2",
            "synthetic_rows=16", "data.prompts_per_step=4", "rollout.n=2", "rollout.max_response_tokens=8",
            "rollout.dtype=float32", "rollout.kv_cache_gib=0.5", "rollout.max_model_len=768",
            "data.max_prompt_tokens=512", "learner.num_learners=1", "reward.num_workers=1"]
    job = submit_with_retry(ray_head, "--submission-id=grpo-smoke", "--", "python", "recipes/grpo_think.py", *args)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "final HOME checkpoint" in job.stdout
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2

    # a second job, stopped while it runs: its actors must go away with it
    submit_with_retry(ray_head, "--submission-id=grpo-stop", "--no-wait", "--", "python", "recipes/grpo_think.py",
                      *args, "trainer.total_steps=50", f"output_dir={tmp_path / 'run2'}")
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "run2" / "metrics.jsonl").exists():
        time.sleep(2)
    assert (tmp_path / "run2" / "metrics.jsonl").exists(), "the second job never started training"
    stopped = ray_cli("job", "stop", f"--address={ADDRESS}", "grpo-stop", env=ray_head)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    deadline = time.time() + 90
    while time.time() < deadline and actor_processes(temp):
        time.sleep(2)
    assert actor_processes(temp) == []
