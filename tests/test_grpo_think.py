"""The main job end to end on tiny HOME models: real Ray, vLLM, DeepSpeed and reward workers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from home_rl.model import FAST, HomeModel, upcycle
from home_rl.rollout.config import RolloutConfig
from home_rl.trainer.grpo_think import GRPOThinkConfig, train
from reward.config import VerifierEntry

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "tests/fixtures/grpo_rewards.py") + ":digit_share"


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


@pytest.fixture(scope="module")
def tiny_home(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "home"
    return upcycle(tiny_model("qwen2")).save_pretrained(out)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rollout_ids(out: Path, step: int) -> list[tuple]:
    lines = (out / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
    return [(r["id"], r["sample"], r["response"]) for r in map(json.loads, lines)]


def test_grpo_trains_only_the_think_expert_and_resumes_exactly(tiny_home, ray_local, tmp_path):
    out = tmp_path / "run"
    final = train(tiny_config(tiny_home, out, steps=3))

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward/mean", "reward/std", "accuracy", "response_length/mean", "response_length/max",
                "actor/clip_frac", "actor/kl", "actor/entropy", "actor/grad_norm", "zero_std_frac",
                "timing/rollout_s", "timing/reward_s", "timing/reference_s", "timing/update_s",
                "timing/weight_sync_s", "timing/step_s", "throughput/tokens_per_s", "reward/math/mean"):
        assert key in metrics[0], key
    assert (out / "config.yaml").is_file() and (out / "plots" / "overview.png").is_file()
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and evals[0]["eval/prompts"] == 4  # held-out: before and after
    assert "eval/accuracy" in metrics[-1] and "eval/accuracy" not in metrics[0]
    assert any((out / "tensorboard").iterdir())

    # only think-expert tensors changed; the KL reference copy is not saved
    before, after = load_file(tiny_home / "model.safetensors"), load_file(Path(final) / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".experts.think." in k for k in changed)

    # so the fast view's logits on a fixed batch are bit-identical
    batch = {"input_ids": torch.arange(1, 41).view(2, 20)}
    with torch.no_grad():
        a = HomeModel.from_pretrained(tiny_home)(route=FAST, **batch).logits
        b = HomeModel.from_pretrained(final)(route=FAST, **batch).logits
    assert torch.equal(a, b)

    # kill after the step-2 checkpoint: drop what came later, resume, and get the same steps 3
    original = {m["step"]: m for m in metrics}
    original_rollouts = rollout_ids(out, 3)
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_00000002")  # the newest complete one would be step 2: test from 1
    train(tiny_config(tiny_home, out, steps=3, trainer__resume="auto"))
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]  # continued after step 1, no duplicate lines
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 3]
    assert rollout_ids(out, 3) == original_rollouts  # same prompts, same samples: data order and weights restored
    for step in (2, 3):
        for key in ("reward/mean", "response_length/mean"):
            assert resumed[step - 1][key] == pytest.approx(original[step][key], abs=1e-6), (step, key)


def test_grpo_with_images_on_tiny_qwen2_5_vl(tiny_model, ray_local, tmp_path):
    from data_pipelines.synthetic import generate

    home = upcycle(tiny_model("qwen2_5_vl")).save_pretrained(tmp_path / "home_vl")
    data = generate("ocr", 8, 0, tmp_path / "ocr")
    cfg = tiny_config(home, tmp_path / "run", steps=2)
    cfg.data.path = str(data)
    cfg.reward.sources = {"ocr": [VerifierEntry(DIGITS, 1.0)]}
    cfg.algorithm.filter_zero_variance = True  # the embedded default's setting
    final = train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["reward/ocr/mean"] >= 0
    assert all(0 <= m["zero_std_frac"] <= 1 and m["regenerations"] in (0, 1, 2) for m in metrics)
    assert HomeModel.from_pretrained(final).arch.multimodal


def test_dense_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "recipes/grpo_think.py"), f"model.path={tiny_model('qwen2')}",
                           f"output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "is a dense checkpoint" in proc.stderr and "Traceback" not in proc.stderr
