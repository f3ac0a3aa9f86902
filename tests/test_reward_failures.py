"""Reward failures are loud: a signature that fits no style and a verifier that cannot score a real row stop the
start-up in one line; at run time failures are counted per data source and verifier, and a verifier failing on
most of a step's samples stops the run, which resumes from its last checkpoint once the verifier is fixed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from home_rl.errors import ConfigError, HomeRLError
from home_rl.model import upcycle
from home_rl.resources import Resources
from home_rl.trainer.grpo_think import train
from reward import RewardConfig, RewardFailureError, RewardPool, VerifierEntry
from reward_runs import FIXTURES, grpo_config, read_metrics, write_rows

REPO = Path(__file__).resolve().parents[1]
FAILING = str(FIXTURES / "failing.py")


def rows(n: int, source: str = "src", late_from: int | None = None) -> list[dict]:
    """n rows of `source`; those from index `late_from` on carry extra_info.late (crashes_on_late_rows raises there)."""
    return [{"id": f"{source}-{i}", "data_source": source, "prompt": f"What is {i} + 1?", "answer": str(i + 1),
             "extra_info": {"late": late_from is not None and i >= late_from}} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_home(tiny_model, tmp_path_factory):
    return upcycle(tiny_model("qwen2")).save_pretrained(tmp_path_factory.mktemp("failures") / "home")


def test_a_signature_that_fits_no_style_is_one_line_at_start_up(tiny_home, ray_local, tmp_path):
    data = write_rows(tmp_path / "data.jsonl", rows(4))
    # the recipe joins this session's Ray runtime (as under `ray job submit`): starting a second one is slow here
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, str(REPO / "recipes/grpo_think.py"), f"model.path={tiny_home}",
                           f"output_dir={tmp_path / 'run'}", f"data.path={data}", "data.prompts_per_step=4",
                           "eval.rows=0", "learner.num_learners=1", "reward.num_workers=1",
                           f"reward.sources.src=[{{name: '{FAILING}:no_style'}}]"],
                          capture_output=True, text=True, timeout=600, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert "reward.sources.src.0" in errors[0] and "no_style(text, expected, weight)" in errors[0]
    assert "fits no calling style" in errors[0] and "openrlhf: reward_func(queries, prompts, labels)" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_signature_that_fits_two_styles_names_them(ray_local):
    with pytest.raises(ConfigError, match=r"reward.sources.rm.0: .*fits more than one calling style \(trl, openrlhf\)"):
        RewardPool(RewardConfig(sources={"rm": [VerifierEntry(f"{FIXTURES / 'styles.py'}:ambiguous")]}))


def test_verifiers_that_cannot_score_a_real_row_fail_the_probe(tiny_home, ray_local, tmp_path):
    data = write_rows(tmp_path / "data.jsonl", rows(4, "a") + rows(4, "b"))
    sources = {"a": [VerifierEntry(f"{FAILING}:always_raises")], "b": [VerifierEntry(f"{FAILING}:returns_text")]}
    cfg = grpo_config(tiny_home, tmp_path / "run", data, sources, steps=1, prompts_per_step=4)
    with pytest.raises(ConfigError) as error:
        train(cfg)  # the driver's start-up: before any rollout worker or learner starts
    message = str(error.value)
    assert "\n" not in message
    assert (f"data_source 'a': verifier '{FAILING}:always_raises' (style home) failed on row 'a-0': "
            f"KeyError: 'solution'") in message
    assert f"data_source 'b': verifier '{FAILING}:returns_text' (style home)" in message
    assert "returned 'correct', not a number" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_failures_are_counted_per_source_and_stop_past_the_rate(ray_local, caplog):
    caplog.set_level(logging.WARNING, logger="reward.pool")
    spec = f"{FAILING}:compute_score"  # one function name, two data sources: two counters
    cfg = RewardConfig(num_workers=1, resources=Resources(cpus=0.5), max_failure_rate=0.5,
                       sources={"a": [VerifierEntry(spec)], "b": [VerifierEntry(spec)]})
    pool = RewardPool(cfg)
    try:
        batch = [{"id": f"{s}{i}", "response": r, "ground_truth": "1", "data_source": s, "extra_info": {}}
                 for s, responses in (("a", ["bad", "ok", "ok", "ok"]), ("b", ["bad", "bad", "ok", "ok"]))
                 for i, r in enumerate(responses)]
        results, metrics = pool.score(batch)  # 1/4 and 2/4 fail: not more than half, the run goes on
        assert [r["score"] for r in results] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
        assert metrics["reward/failures/a/compute_score/exception"] == 1
        assert metrics["reward/failures/b/compute_score/exception"] == 2
        summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward failures")]
        assert summary == ["reward failures in this batch of 8 samples: a/compute_score 1/4 (1 exception); "
                           "b/compute_score 2/4 (2 exception)"]
        firsts = [r.getMessage() for r in caplog.records if "first exception" in r.getMessage()]
        assert len(firsts) == 2 and "RuntimeError: cannot score 'bad'" in firsts[0]

        batch[6]["response"] = "bad again"  # b: 3 of 4
        with pytest.raises(RewardFailureError) as error:
            pool.score(batch)
        assert isinstance(error.value, HomeRLError) and "\n" not in str(error.value)
        assert (f"reward: verifier '{spec}' (style verl) of data_source 'b' failed on 3 of 4 samples in one batch "
                f"(75% > reward.max_failure_rate=0.5); first exception, on sample id='b0': RuntimeError: "
                f"cannot score 'bad'") in str(error.value)
        assert "trainer.resume=auto" in str(error.value)
    finally:
        pool.shutdown()


def test_a_verifier_that_breaks_mid_run_stops_it_and_the_run_resumes_once_fixed(tiny_home, ray_local, tmp_path):
    data = write_rows(tmp_path / "data.jsonl", rows(8, "src", late_from=4))  # step 1: rows 0-3, step 2: rows 4-7
    out = tmp_path / "run"

    def config(function: str):
        return grpo_config(tiny_home, out, data, {"src": [VerifierEntry(f"{FAILING}:{function}")]}, steps=2,
                           prompts_per_step=4, stratify_by="")

    with pytest.raises(RewardFailureError, match=r"crashes_on_late_rows' \(style home\) of data_source 'src' failed on "
                                                 r"16 of 16 samples .*ValueError: cannot parse answer '5'"):
        train(config("crashes_on_late_rows"))
    assert [m["step"] for m in read_metrics(out)] == [1]
    assert (out / "checkpoints" / "step_00000001").is_dir() and not (out / "final").exists()

    train(config("handles_late_rows"))  # fixed; trainer.resume=auto continues from step 1
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["reward/mean"] == pytest.approx(0.25) and metrics[1]["reward/mean"] == pytest.approx(0.75)
    assert metrics[1]["reward_pool/failures"] == 0 and (out / "final").is_dir()
