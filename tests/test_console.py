"""What a user meets at the console: the main recipe run as a subprocess on a tiny HOME model.

A quiet run prints a few lines and leaves one log file per actor; a failure inside an actor shows
its cause and the log files; a driver killed with SIGKILL leaves Ray processes that the next
local start ends and names.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from home_rl import leftovers

REPO = Path(__file__).resolve().parents[1]
LINE_BUDGET = 40  # the acceptance bar of the embedded default's one-step run; the tiny run needs far fewer


def tiny_args(home: Path, out: Path, steps: int = 1) -> list[str]:
    return [f"model.path={home}", "model.dtype=float32", f"output_dir={out}", f"trainer.total_steps={steps}",
            "synthetic_rows=16", "data.prompts_per_step=4", "rollout.n=2", "rollout.max_response_tokens=8",
            "rollout.dtype=float32", "rollout.kv_cache_gib=0.5", "rollout.max_model_len=768",
            "data.max_prompt_tokens=512", "learner.num_learners=1", "reward.num_workers=1", "eval.rows=4"]


def recipe(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "recipes/grpo_think.py"), *args]


def env() -> dict:
    # this checkout's code in the recipe and in every Ray worker it starts
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_console(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the recipe as a user would; its exit and every line it printed to the console."""
    proc = subprocess.run(recipe(*args), capture_output=True, text=True, env=env(), timeout=900)
    return proc, (proc.stdout + proc.stderr).splitlines()


def test_quiet_run_prints_phases_and_steps_and_logs_each_actor(tiny_home, tmp_path):
    out = tmp_path / "run"
    proc, console = run_console(*tiny_args(tiny_home("qwen2"), out), "trainer.log_every=1")
    assert proc.returncode == 0, "\n".join(console[-30:])
    assert len(console) <= LINE_BUDGET, "\n".join(console)
    text = "\n".join(console)
    for line in ("memory: plan fits: learner ", "learner.zero_stage=auto chose ZeRO stage 0", "ray: local runtime",
                 "reward: 1 worker ready (", "rollout: 1 vLLM worker ready (", "learners: 1 ready (",
                 "learnability: pass@1 0.00, pass@2 0.00, 100% of ", "grpo step 1/1: reward 0.000", " s/step, 0 s left",
                 # a random tiny model never answers right: every group scores alike, and the run says so
                 "learnability: 100% of prompt groups score all alike", "too hard", "final HOME checkpoint"):
        assert line in text, (line, text)
    for noise in ("INFO 1", "vLLM engine", "DeepSpeed", "FutureWarning"):  # library output
        assert noise not in text, (noise, text)
    assert all("warning: " in line for line in console if "pid=" in line), text  # actors forward only warnings

    assert "zero_stage: 0\n" in (out / "config.yaml").read_text()  # the stage auto chose, as it ran
    logs = out / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["driver.log", "export-view.log", "learner-0.log", "reward-0.log",
                                                      "rollout-0.log"]
    rollout_log = (logs / "rollout-0.log").read_text()
    assert rollout_log.startswith("==== home-rl rollout-0: pid ") and "non-default args" in rollout_log  # vLLM's own
    assert "DeepSpeed" in (logs / "learner-0.log").read_text()
    assert "learners: 1 ready" in (logs / "driver.log").read_text()


def test_a_failure_inside_an_actor_shows_its_cause_and_log_files(tiny_home, tmp_path):
    out = tmp_path / "run"
    # a KV cache of 100 KB cannot hold one sequence of max_model_len (768 tokens x 512 B here): vLLM refuses it
    # inside the rollout actor's __init__ (the memory plan leaves the CPU build's KV sizing to vLLM)
    proc, console = run_console(*tiny_args(tiny_home("qwen2"), out), "rollout.kv_cache_gib=0.0001")
    assert proc.returncode == 1, "\n".join(console[-30:])
    assert "Traceback" not in proc.stderr and len(console) <= 10, "\n".join(console)
    error = console[-1]
    assert error.startswith("error: ") and "max_model_len" in error, error
    assert f"in rollout-0, its output: {out / 'logs' / 'rollout-0.log'}" in error, error
    assert f"traceback: {out / 'logs' / 'driver.log'}" in error, error
    driver_log = (out / "logs" / "driver.log").read_text()
    assert "Traceback" in driver_log and "RolloutWorker" in driver_log  # the actor's remote traceback too


def test_a_max_model_len_above_the_models_context_is_refused_before_any_actor(tiny_home, tmp_path):
    out = tmp_path / "run"
    proc, console = run_console(*tiny_args(tiny_home("qwen2"), out), "rollout.max_model_len=4096")
    assert proc.returncode == 2, "\n".join(console[-30:])
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: rollout.max_model_len=4096 is above the model's context of 2048 tokens"), error
    assert "Traceback" not in proc.stderr
    assert not (out / "logs" / "rollout-0.log").exists() and not (out / "logs" / "learner-0.log").exists()


def ps() -> dict[int, tuple[int, str]]:
    rows = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    parts = [line.split(None, 2) for line in rows.splitlines()]
    return {int(p[0]): (int(p[1]), p[2] if len(p) > 2 else "") for p in parts}


def descendants(root: int) -> dict[int, str]:
    table = ps()
    found, grew = {root}, True
    while grew:
        new = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= new
        grew = bool(new)
    return {pid: table[pid][1] for pid in found - {root}}


def test_the_next_local_start_ends_what_a_sigkilled_driver_left(tiny_home, tmp_path, request):
    out = tmp_path / "run"
    driver = subprocess.Popen(recipe(*tiny_args(tiny_home("qwen2"), out, steps=50)), env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (out / "metrics.jsonl").exists() and driver.poll() is None:
            time.sleep(2)
        log = out / "logs" / "driver.log"
        assert (out / "metrics.jsonl").exists(), log.read_text()[-3000:] if log.exists() else "no driver.log"
        ours = descendants(driver.pid)  # its Ray runtime: gcs_server, raylet, agents, actors, ...
        # its session folder, as its gcs_server's and raylet's command lines name it (a folder name alone
        # may match an older session of a reused pid)
        session = sorted({m.group(0) for a in ours.values() for m in [leftovers.SESSION.search(a)] if m})
        assert len(session) == 1 and any("ray::RolloutWorker" in a for a in ours.values()), ours
    finally:
        driver.send_signal(signal.SIGKILL)  # as the OOM killer does: no finally block, no atexit
        driver.wait()
    # the raylet and the workers go with the driver; the agents stay (Ray 2.60), older by now than
    # leftovers.MIN_AGE_S: they started with the runtime, before the actors and the first step
    time.sleep(10)
    left = {pid: args for pid, args in ours.items() if ps().get(pid, (0, ""))[1] == args}
    assert left and all(a.startswith("ray::") for a in left.values()), left

    # a live runtime while the next start cleans up: the test session's own (started only now: two Ray
    # runtimes starting at once on a loaded 2-core machine can overrun Ray's 30 s start-up limit)
    ray_local = request.getfixturevalue("ray_local")
    start = ("from home_rl import console; console.setup({out!r}, 'quiet'); "
             "from home_rl.trainer.startup import ensure_ray; ensure_ray(1)").format(out=str(tmp_path / "next"))
    nxt = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True, env=env(), timeout=300)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    said = [line for line in nxt.stderr.splitlines() if "ray: ended" in line]
    assert len(said) == 1 and Path(session[0]).name in said[0], nxt.stderr
    assert all(name in said[0] for name in {a.split()[0] for a in left.values()}), (said, left)
    assert not {pid for pid, args in ours.items() if ps().get(pid, (0, ""))[1] == args}, "leftovers survived"

    @ray_local.remote
    def alive() -> int:
        return 1

    assert ray_local.get(alive.remote()) == 1  # the test session's own runtime was left alone
