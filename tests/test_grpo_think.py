"""The main job end to end on tiny HOME models: real Ray, vLLM, DeepSpeed and reward workers."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from home_rl.model import FAST, HomeModel
from home_rl.rollout.config import RolloutConfig
from home_rl.trainer.grpo_think import GRPOThinkConfig, GRPOThinkTrainer, train
from reward import get_verifier
from reward.config import VerifierEntry

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "tests/fixtures/grpo_rewards.py") + ":digit_share"
LEADING_DIGIT = str(REPO / "tests/fixtures/grpo_rewards.py") + ":leading_digit"
# The rising-reward run. One response token decides the reward, so only it is sampled. Measured with
# seed 0, the same numbers in three runs: held-out reward 0.234 -> 0.578, the steps' reward 0.22 -> 0.66
# (first two vs last two steps); the test took 58-84 s (load average about 10), 19-28 s of it the steps.
# While choosing: lr 0.05 for 12 steps reached only 0.30 held out; two response tokens with 8 prompts
# a step plateaued near 0.35 over 40 steps, and with 4 prompts at lr 0.01 crept 0.19 -> 0.31 in 20:
# larger or noisier steps wander instead of climbing.
RISE_STEPS = 20
RISE_SETTINGS = dict(data__prompts_per_step=16, rollout__max_response_tokens=1, learner__lr=0.02,
                     algorithm__kl_coef=0.0, trainer__save_every=0, eval__rows=8, eval__n=8)
RISE_MARGIN = 0.2
# The shared 3-step run samples below temperature 1: the learners must compute the tempered policy that sampled.
RUN_SETTINGS = dict(rollout__temperature=0.7)


def tiny_config(home: Path, out: Path, steps: int, **overrides) -> GRPOThinkConfig:
    cfg = GRPOThinkConfig()
    cfg.model.path, cfg.model.dtype = str(home), "float32"
    cfg.output_dir = str(out)
    cfg.synthetic_rows, cfg.synthetic_levels = 24, "1-3"
    cfg.data.prompts_per_step, cfg.data.max_prompt_tokens = 4, 512
    cfg.rollout = RolloutConfig(n=4, max_response_tokens=12, dtype="float32", kv_cache_gib=0.5, max_model_len=768,
                                temperature=1.0, stop=[])
    cfg.reward.num_workers = 1
    cfg.reward.sources = {"math": [VerifierEntry(DIGITS, 1.0)]}
    cfg.learner.num_learners, cfg.learner.lr, cfg.learner.micro_batch_size = 1, 1e-3, 8
    cfg.algorithm.kl_coef = 0.01  # the frozen think_ref copy and reference log-probs are exercised
    cfg.algorithm.filter_zero_variance = False  # steps of 4 groups exactly, for the resume comparison
    cfg.trainer.total_steps, cfg.trainer.save_every, cfg.trainer.log_every = steps, 1, 1
    cfg.eval.rows = 4
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value) if name else setattr(cfg, section, value)
    return cfg


def read_metrics(out: Path, step_0: bool = False) -> list[dict]:
    """The steps' metrics (with `step_0`, also what was measured before the first step)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if step_0 or r["step"] > 0]


def read_rollouts(out: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]


def rollout_ids(out: Path, step: int) -> list[tuple]:
    return [(r["id"], r["sample"], r["response"]) for r in read_rollouts(out, step)]


def score_groups(samples: list[dict], n: int) -> list[list[float]]:
    """The scores of each prompt's group, in the order the step sampled them (a group's n samples are adjacent)."""
    assert len(samples) % n == 0 and [s["sample"] for s in samples] == list(range(n)) * (len(samples) // n)
    return [[s["score"] for s in samples[i:i + n]] for i in range(0, len(samples), n)]


def zero_std_share(groups: list[list[float]]) -> float:
    return sum(len(set(g)) == 1 for g in groups) / len(groups)


def train_losing_the_engine(cfg: GRPOThinkConfig, at_step: int) -> list[dict]:
    """Run `cfg`, SIGKILLing the rollout engine just before it makes step `at_step`'s batch (it is found dead by
    that call, restarted and filled from learner rank 0); the steps' metrics."""
    trainer = GRPOThinkTrainer(cfg)
    pool = trainer.rollout.pool
    generate, victim = pool.generate, pool.info[0]["pid"]

    def generate_after_a_loss(prompts, *args, seed=None, **kwargs):
        if seed == cfg.seed * 100_003 + at_step - 1:  # the seed of step `at_step`'s rollout (steps count from 0 there)
            os.kill(victim, signal.SIGKILL)
            while os.path.exists(f"/proc/{victim}"):
                time.sleep(0.05)
        return generate(prompts, *args, seed=seed, **kwargs)

    pool.generate = generate_after_a_loss
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    assert pool.info[0]["pid"] != victim
    return read_metrics(Path(cfg.output_dir))


# ----------------------------------------------------------------------------- one 3-step run, several tests


@pytest.fixture(scope="module")
def run(tiny_home, ray_local, tmp_path_factory):
    """One 3-step run on the tiny text model; the tests below each check one thing it did (it runs once)."""
    home = tiny_home("qwen2")
    out = tmp_path_factory.mktemp("grpo") / "run"
    cfg = tiny_config(home, out, steps=3, **RUN_SETTINGS)
    final = Path(train(cfg))
    return SimpleNamespace(home=home, out=out, final=final, cfg=cfg, metrics=read_metrics(out))


def test_each_step_logs_metrics_that_agree_with_its_rollouts(run):
    cfg, metrics = run.cfg, run.metrics
    assert [m["step"] for m in metrics] == [1, 2, 3]
    n, want = cfg.rollout.n, cfg.data.prompts_per_step
    verifier = get_verifier(DIGITS)
    vocab = json.loads((run.home / "config.json").read_text())["vocab_size"]
    kls = []
    for m in metrics:
        samples = read_rollouts(run.out, m["step"])
        assert len(samples) == want * n and all(s["trained"] for s in samples)  # no filtering in this run
        # the step sampled with the weights of the step before: the learners' update reached the engines
        assert {s["weights_version"] for s in samples} == {m["step"] - 1}
        scores = [s["score"] for s in samples]
        assert scores == [verifier(s["response"], None, data_source="math", extra_info={}) for s in samples]
        assert m["reward/mean"] == pytest.approx(np.mean(scores), abs=1e-9)
        assert m["reward/std"] == pytest.approx(np.std(scores), abs=1e-9)
        # one verifier of weight 1 on one data source: accuracy, the per-source and the trained mean are the reward
        for key in ("accuracy", "reward/math/mean", "reward/trained_mean"):
            assert m[key] == pytest.approx(m["reward/mean"], abs=1e-9), key
        assert m["zero_std_frac"] == zero_std_share(score_groups(samples, n)) and m["regenerations"] == 0

        length_share = np.mean([s["finish"] == "length" for s in samples])
        assert m["response_length/clip_frac"] == pytest.approx(length_share)
        assert m["response_length/mean"] <= m["response_length/max"] <= cfg.rollout.max_response_tokens
        assert (m["response_length/max"] == cfg.rollout.max_response_tokens) == (length_share > 0)
        generated = m["response_length/mean"] * len(samples)
        assert m["throughput/generated_tokens_per_s"] * m["timing/rollout_s"] == pytest.approx(generated, rel=1e-6)
        assert m["throughput/tokens_per_s"] * m["timing/step_s"] > generated  # prompt tokens count too
        phases = ("rollout_s", "reward_s", "old_log_prob_s", "reference_s", "update_s", "weight_sync_s")
        assert all(m[f"timing/{p}"] >= 0 for p in phases)
        assert m["timing/step_s"] >= sum(m[f"timing/{p}"] for p in phases), {k: v for k, v in m.items() if "timing" in k or k == "step"}  # the phases are disjoint parts of it

        # one epoch of one mini-batch: the old policy is the current one, so the PPO ratio is exactly 1
        assert m["actor/clip_frac"] == 0 and m["actor/ppo_kl"] == 0
        assert m["actor/lr"] == pytest.approx(cfg.learner.lr) and m["actor/grad_norm"] > 0
        assert 0 < m["actor/entropy"] <= math.log(vocab)
        kls.append(m["actor/kl"])
    # KL to the frozen initial think expert: none before the first update, some after it
    assert kls[0] == pytest.approx(0, abs=1e-6) and min(kls[1:]) > 1e-4, kls


def test_learner_log_probs_match_the_engines_at_the_sampling_temperature(run):
    """Every step compares the learner's log-probs of the sampled tokens (before its update, at
    rollout.temperature) with the engine's log-probs of the distribution it sampled from."""
    assert run.cfg.rollout.temperature == 0.7 and run.cfg.rollout.logprobs_mode == "processed_logprobs"
    for m in run.metrics:
        assert m["rollout/logprob_diff_mean"] <= 1e-3, m
        assert m["rollout/logprob_pearson"] >= 0.999, m
        assert m["rollout/logprob_diff_mean"] <= m["rollout/logprob_diff_max"] <= 1e-2, m


def test_the_starting_policy_is_measured_before_the_first_step(run):
    first = read_metrics(run.out, step_0=True)[0]
    assert first["step"] == 0 and first["learnability/prompts"] == 16 and first["learnability/n"] == run.cfg.rollout.n
    assert 0 <= first["learnability/alike_share"] <= 1 and first["learnability/entropy"] > 0
    assert first["learnability/pass_at_1"] <= first["learnability/pass_at_n"]


def test_the_run_writes_a_config_that_loads_again_plots_and_tensorboard(run):
    from home_rl.config import load_config

    again = load_config(GRPOThinkConfig, ["--config", str(run.out / "config.yaml")])
    assert again.model.path == str(run.home) and again.trainer.total_steps == 3 and again.rollout.n == 4
    assert again.learner.lr == run.cfg.learner.lr and again.data.path == str(run.out / "data" / "data.jsonl")
    assert (run.out / "plots" / "overview.png").is_file()
    assert any((run.out / "tensorboard").iterdir())


def test_the_think_view_is_scored_on_held_out_prompts_before_and_after(run):
    evals = [json.loads(line) for line in (run.out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and [e["eval/prompts"] for e in evals] == [4, 4]
    # the last step's metrics carry the final evaluation; earlier steps none
    assert "eval/accuracy" in run.metrics[-1]
    assert all(run.metrics[-1][k] == v for k, v in evals[-1].items() if k.startswith("eval/"))
    assert not any(k.startswith("eval/") for m in run.metrics[:-1] for k in m)
    held_out = [json.loads(line)["prompt"] for line in Path(run.cfg.eval.path).read_text().splitlines()]
    training = {json.loads(line)["prompt"] for line in Path(run.cfg.data.path).read_text().splitlines()}
    assert len(held_out) == 4 and not set(held_out) & training


def test_only_think_expert_tensors_change(run):
    before, after = load_file(run.home / "model.safetensors"), load_file(run.final / "model.safetensors")
    assert before.keys() == after.keys()  # the KL reference copy (think_ref) is not saved
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".experts.think." in k for k in changed)


def test_the_fast_view_logits_are_bit_identical(run):
    batch = {"input_ids": torch.arange(1, 41).view(2, 20)}
    with torch.no_grad():
        a = HomeModel.from_pretrained(run.home)(route=FAST, **batch).logits
        b = HomeModel.from_pretrained(run.final)(route=FAST, **batch).logits
    assert torch.equal(a, b)


def test_a_resumed_run_that_loses_its_engine_repeats_the_uninterrupted_steps_exactly(run, tmp_path):
    # as if killed after the step-1 checkpoint: a copy of the run without what came later (the newest
    # complete checkpoint would be step 2), resumed in place; its engine is SIGKILLed before step 3's batch, then
    # restarted and filled with version 2 from learner rank 0
    out = tmp_path / "run"
    shutil.copytree(run.out, out)
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    for name in ("metrics.jsonl", "eval.jsonl"):  # the kill cut a line in half
        with open(out / name, "a") as f:
            f.write('{"step": 3, "eval/accuracy": 0.')
    resumed = train_losing_the_engine(tiny_config(run.home, out, steps=3, trainer__resume="auto", **RUN_SETTINGS),
                                      at_step=3)
    assert [m["step"] for m in resumed] == [1, 2, 3]  # continued after step 1, no duplicate lines
    assert [m["rollout/worker_restarts"] for m in resumed] == [0, 0, 1]
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 3]
    for step in (2, 3):  # same prompts, same samples: data order and weights restored
        assert rollout_ids(out, step) == rollout_ids(run.out, step), step
        for key in ("reward/mean", "response_length/mean"):
            assert resumed[step - 1][key] == pytest.approx(run.metrics[step - 1][key], abs=1e-6), (step, key)


def test_synchronous_steps_train_on_fresh_rollouts_and_log_each_side_s_idle_time(run):
    for m in run.metrics:
        assert m["async/staleness_max"] == m["async/staleness_mean"] == 0
        assert not any(k.startswith("async/is_") for k in m)  # no correction: the old policy made them
        # the learners wait for the rollout, the engines for the update (and the weight gather)
        assert m["timing/learner_idle_s"] >= m["timing/rollout_s"] + m["timing/reward_s"] - 0.05
        assert m["timing/rollout_idle_s"] >= m["timing/update_s"] - 0.05


def test_zero3_learners_send_whole_layers_to_two_engines(tiny_home, ray_local, tmp_path):
    """Two ZeRO-3 learners gather the think expert a decoder layer at a time onto rank 0, which sends it straight to
    two engines: one bucket per layer, holding its gate, up and down projections (gate/up are one fused layer in
    vLLM), and the engines then sample what the learners compute."""
    home = tiny_home("qwen2")
    out = tmp_path / "run"
    cfg = tiny_config(home, out, steps=2, trainer__save_every=0, eval__rows=0)
    cfg.learner.num_learners, cfg.learner.zero_stage, cfg.rollout.num_workers = 2, 3, 2
    train(cfg)
    metrics = read_metrics(out)
    layers = json.loads((home / "config.json").read_text())["num_hidden_layers"]
    pushed = metrics[1]  # version 1, sent after step 1's update, is reported with step 2
    assert pushed["weight_sync/buckets"] == layers and pushed["weight_sync/tensors"] == 3 * layers, pushed
    assert {s["weights_version"] for s in read_rollouts(out, 2)} == {1}
    assert {s["worker"] for s in read_rollouts(out, 2)} == {0, 1}
    for m in metrics:
        assert m["rollout/logprob_diff_mean"] <= 1e-3 and m["rollout/logprob_pearson"] >= 0.999, m


# ----------------------------------------------------------------------------- asynchronous GRPO


@pytest.fixture(scope="module")
def async_run(tiny_home, ray_local, tmp_path_factory):
    """4 steps with trainer.max_staleness=1 and a checkpoint after step 2 (its next rollouts made ahead)."""
    home = tiny_home("qwen2")
    out = tmp_path_factory.mktemp("grpo_async") / "run"
    cfg = tiny_config(home, out, steps=4, trainer__max_staleness=1, trainer__save_every=2)
    train(cfg)
    return SimpleNamespace(home=home, out=out, cfg=cfg, metrics=read_metrics(out))


def test_asynchronous_steps_train_on_rollouts_one_version_old_weighed_by_tis(async_run):
    metrics = async_run.metrics
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # step j (from 1) trains weights version j - 1 on rollouts of version max(0, j - 2)
    assert [{s["weights_version"] for s in read_rollouts(async_run.out, m["step"])} for m in metrics] == \
        [{0}, {0}, {1}, {2}]
    assert [m["async/staleness_max"] for m in metrics] == [0, 1, 1, 1]
    threshold = async_run.cfg.algorithm.rollout_is_threshold
    assert async_run.cfg.algorithm.rollout_is == "token"  # auto with max_staleness > 0
    for m in metrics:
        assert 0 < m["async/is_weight_mean"] <= threshold and m["async/is_weight_max"] > 0
        assert 0 <= m["async/is_truncated_frac"] <= 1
        assert m["timing/learner_idle_s"] >= 0 and m["timing/rollout_idle_s"] >= 0
    # a version behind, the behaviour policy differs from the old one: weights move away from 1
    assert any(abs(m["async/is_weight_max"] - 1) > 1e-3 for m in metrics[1:])
    assert (async_run.out / "checkpoints" / "step_00000002" / "pending_rollouts.pkl").is_file()


def test_an_asynchronous_run_resumed_with_rollouts_in_flight_repeats_the_uninterrupted_steps(async_run, tmp_path):
    """As if killed right after the step-2 checkpoint, which holds step 3's rollouts (made by version 1). Its engine
    is SIGKILLed before step 4's batch (version 2), while the learners train step 3: it is restarted and filled from
    learner rank 0, on rank 0's own thread."""
    out = tmp_path / "run"
    shutil.copytree(async_run.out, out)
    resumed = train_losing_the_engine(tiny_config(async_run.home, out, steps=4, trainer__max_staleness=1,
                                                  trainer__save_every=2, trainer__resume="auto"), at_step=4)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["rollout/worker_restarts"] for m in resumed] == [0, 0, 0, 1]
    for step in (3, 4):
        assert rollout_ids(out, step) == rollout_ids(async_run.out, step), step
        for key in ("reward/mean", "response_length/mean", "async/staleness_max"):
            assert resumed[step - 1][key] == pytest.approx(async_run.metrics[step - 1][key], abs=1e-6), (step, key)


def test_asynchronous_mode_refuses_colocated_placement(tiny_home, tmp_path):
    from home_rl.config import load_config
    from home_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(GRPOThinkConfig, ["trainer.max_staleness=1", "cluster.mode=colocated", f"output_dir={tmp_path}"])


# ----------------------------------------------------------------------------- other runs


def test_grpo_raises_a_reward_the_tiny_model_can_learn(tiny_home, ray_local, tmp_path):
    """The think expert learns to start its answers with a digit: a reward that must rise, not only vary."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny_home("qwen2"), out, steps=RISE_STEPS, **RISE_SETTINGS)
    cfg.reward.sources = {"math": [VerifierEntry(LEADING_DIGIT, 1.0)]}
    train(cfg)
    rewards = [m["reward/mean"] for m in read_metrics(out)]
    evals = [json.loads(line)["eval/reward/mean"] for line in (out / "eval.jsonl").read_text().splitlines()]
    # about a fifth of the answers start with a digit before training (22% of the first token's probability)
    assert evals[0] < 0.3 and np.mean(rewards[:2]) < 0.3, (evals, rewards)
    # on held-out prompts with the same sampling seed before and after, and on the training batches
    assert evals[-1] - evals[0] >= RISE_MARGIN, (evals, rewards)
    assert np.mean(rewards[-2:]) - np.mean(rewards[:2]) >= RISE_MARGIN, (evals, rewards)


def test_grpo_with_images_on_tiny_qwen2_5_vl(tiny_home, ray_local, tmp_path):
    from data_pipelines.synthetic import generate

    data = generate("ocr", 8, 0, tmp_path / "ocr")
    cfg = tiny_config(tiny_home("qwen2_5_vl"), tmp_path / "run", steps=2)
    cfg.data.path = str(data)
    cfg.reward.sources = {"ocr": [VerifierEntry(DIGITS, 1.0)]}
    cfg.algorithm.filter_zero_variance = True  # the embedded default's setting
    final = train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    n, want, limit = cfg.rollout.n, cfg.data.prompts_per_step, cfg.algorithm.max_regenerations
    for m in metrics:
        samples = read_rollouts(tmp_path / "run", m["step"])  # every group sampled, trained on or filtered out
        groups = score_groups(samples, n)
        assert m["reward/ocr/mean"] == pytest.approx(np.mean([s["score"] for s in samples]), abs=1e-9)
        # zero_std_frac is the first round's share of all-alike groups; each regeneration samples one more round
        assert len(groups) == want * (1 + m["regenerations"])
        assert m["zero_std_frac"] == zero_std_share(groups[:want])
        # rounds are sampled until `want` groups with unequal rewards are found, or up to the limit
        informative = np.cumsum([sum(len(set(g)) > 1 for g in groups[i:i + want]) for i in range(0, len(groups), want)])
        assert m["regenerations"] == next((i for i, k in enumerate(informative) if k >= want), limit)
        trained = [samples[i * n]["trained"] for i in range(len(groups))]
        assert sum(trained) == min(want, informative[-1])
        assert all(len(set(g)) > 1 for g, t in zip(groups, trained) if t)  # only groups that carry a signal
    assert HomeModel.from_pretrained(final).arch.multimodal


def test_dense_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "recipes/grpo_think.py"), f"model.path={tiny_model('qwen2')}",
                           f"output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "is a dense checkpoint" in proc.stderr and "Traceback" not in proc.stderr
