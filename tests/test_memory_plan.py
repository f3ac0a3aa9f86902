"""The memory plan (home_rl/memory_plan/, recipes/plan.py): from config.json alone, refused before any actor.

The Qwen2.5-VL-7B HOME fixture is a config.json only (the published shapes plus the `home` section that
upcycling writes): the plan never needs weights.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from home_rl import memory_plan
from home_rl.config import load_config
from home_rl.errors import ConfigError
from home_rl.memory_plan import GIB, described_cluster, model_shape, plan_for_config
from home_rl.trainer.grpo_config import GRPOThinkConfig
from home_rl.trainer.startup import check_memory as startup_check_memory

REPO = Path(__file__).resolve().parents[1]
HOME_7B = REPO / "tests" / "fixtures" / "qwen2_5_vl_7b_home"
CONFIG_7B = REPO / "recipes" / "configs" / "qwen2_5_vl_7b_8gpu.yaml"
EIGHT_GPUS = ["--nodes", "1", "--gpus-per-node", "8", "--gpu-gib", "80", "--host-gib", "1000"]
ANSWER_S = 10.0  # the CLI must answer within this


def config_7b(*overrides: str) -> GRPOThinkConfig:
    return load_config(GRPOThinkConfig, ["--config", str(CONFIG_7B), f"model.path={HOME_7B}", *overrides])


def actor(plan, role: str):
    return next(a for a in plan.actors if a.role == role)


def test_the_7b_config_counts_and_fits_as_its_comments_say():
    shape = model_shape(HOME_7B, "think", ["think_ref=think"])
    assert round(shape.params / 1e9, 2) == 19.70 and round(shape.trainable / 1e9, 2) == 5.70
    assert round(shape.frozen_copies / 1e9, 2) == 5.70 and round(shape.vision / 1e9, 2) == 0.68
    assert round(shape.view / 1e9, 2) == 8.29 and shape.home_checkpoint / 1e9 == pytest.approx(13.99, abs=0.01)
    assert shape.context == 128000 and shape.vocab == 152064

    plan = plan_for_config(config_7b("learner.zero_stage=3"), cluster=described_cluster(1, 8, 80, 1000))
    assert plan.fits, plan.table()
    learner = actor(plan, "learner")
    gb = {k: v * GIB / 1e9 for k, v in learner.parts.items()}
    # the config's hand arithmetic: 9.9 + 2.9 + 17.1 GB per GPU, "about 30 GB before activations"; ZeRO-3 adds
    # the fp32 gradient partition its optimizer steps on (5.7 GB)
    assert gb["weights"] == pytest.approx(9.85, abs=0.05) and gb["gradients"] == pytest.approx(2.85 + 5.70, abs=0.05)
    assert gb["optimizer"] == pytest.approx(17.1, abs=0.1)
    assert 29 < gb["weights"] + 2.85 + gb["optimizer"] < 31
    assert learner.count == 4 and learner.device == "cuda" and learner.predicted_gib < 80
    rollout = actor(plan, "rollout")
    assert rollout.parts["weights"] * GIB / 1e9 == pytest.approx(16.6, abs=0.1)  # 8.29 B in bf16
    assert actor(plan, "host node 0").predicted_gib > 4 * rollout.parts["weights"]  # the host RAM is stated


def test_a_tiny_models_counts_are_its_real_parameters(tiny_home):
    """The meta-device count equals the loaded model's, per category (trainable, frozen copies, the rest)."""
    from home_rl.learner.config import trainable_patterns
    from home_rl.learner.optim import select_trainable
    from home_rl.model import HomeModel

    folder = tiny_home("qwen2_5_vl")
    shape = model_shape(folder, "think", ["think_ref=think"])
    model = HomeModel.from_pretrained(folder, copies={"think_ref": "think"})
    trainable = select_trainable(model, trainable_patterns("think"), ("*.experts.think_ref.*",))
    params = dict(model.named_parameters())
    assert shape.params == sum(p.numel() for p in params.values())
    assert shape.trainable == sum(params[n].numel() for n in trainable)
    assert shape.frozen_copies == sum(p.numel() for n, p in params.items() if ".think_ref." in n)
    assert shape.vision == sum(p.numel() for n, p in params.items() if ".visual." in n) > 0
    assert shape.multimodal and shape.is_home and shape.context == 2048


def test_zero_stage_auto_is_the_lowest_stage_that_fits(tiny_home, caplog):
    big = plan_for_config(config_7b(), cluster=described_cluster(1, 8, 80, 1000))
    assert big.zero_stage == 3  # with 80 GB only ZeRO-3's partitioned weights leave room
    roomy = plan_for_config(config_7b(), cluster=described_cluster(1, 8, 141, 2000))
    assert roomy.zero_stage in (1, 2) and roomy.fits, roomy.table()
    below = memory_plan.plan(model_shape(HOME_7B, "think", ["think_ref=think"]), config_7b().memory_run(),
                             described_cluster(1, 8, 141, 2000), roomy.zero_stage - 1)
    assert not below.fits  # the stage below does not fit

    cfg = load_config(GRPOThinkConfig, [f"model.path={tiny_home('qwen2')}", "output_dir=/tmp/unused",
                                        "learner.num_learners=2"])
    assert cfg.learner.zero_stage == "auto"
    assert memory_plan.check_memory(cfg, tiny_home("qwen2")).zero_stage == 0
    assert cfg.learner.zero_stage == "auto"  # the plan reports the stage; the start-up check records it
    with caplog.at_level("INFO", logger="home_rl.trainer.startup"):
        startup_check_memory(cfg, tiny_home("qwen2"), 0)
    assert cfg.learner.zero_stage == 0  # a tiny model fits unpartitioned: the recipe writes 0 into config.yaml
    assert "learner.zero_stage=auto chose ZeRO stage 0" in caplog.text


def test_a_refusal_names_the_actor_and_the_knob_and_check_memory_false_skips_it():
    cfg = config_7b("learner.micro_batch_size=64", "learner.gradient_checkpointing=false")
    with pytest.raises(ConfigError) as err:
        memory_plan.check_memory(cfg, HOME_7B, cluster=described_cluster(1, 8, 80, 1000))
    line = str(err.value)
    assert "\n" not in line and line.startswith("memory plan: learner needs ")
    assert "learner.micro_batch_size" in line and "learner.gradient_checkpointing=true" in line
    cfg = config_7b("learner.micro_batch_size=64", "learner.gradient_checkpointing=false", "cluster.check_memory=false")
    assert not memory_plan.check_memory(cfg, HOME_7B, cluster=described_cluster(1, 8, 80, 1000)).fits


def test_lengths_against_the_model(tiny_home):
    # Loading refuses such lengths already (home_rl/context_length.py, tests/test_context_length.py); set after
    # loading, they reach the plan's own check.
    home = tiny_home("qwen2")
    cfg = load_config(GRPOThinkConfig, [f"model.path={home}", "output_dir=/tmp/unused"])
    cfg.rollout.max_model_len = 4096
    with pytest.raises(ConfigError, match="rollout.max_model_len=4096 is above the model's context of 2048"):
        memory_plan.check_memory(cfg, home)
    cfg = load_config(GRPOThinkConfig, [f"model.path={home}", "output_dir=/tmp/unused",
                                        "cluster.check_memory=false"])  # lengths are checked all the same
    cfg.rollout.max_model_len = 256
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens=192 \+ rollout.max_response_tokens=160 = 352 "
                                          r"is above rollout.max_model_len=256"):
        memory_plan.check_memory(cfg, home)


@pytest.fixture(scope="module")
def counted_7b():
    """The 7B's parameter counts in the shape cache, as after any earlier plan of it: the first plan of a
    config.json also imports transformers' modelling code to count on the meta device (3-7 s here)."""
    model_shape(HOME_7B, "think", ["think_ref=think"])


def plan_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=120)
    return proc, time.perf_counter() - start


def test_cli_fits_states_the_host_ram_and_answers_in_json(counted_7b):
    proc, seconds = plan_cli("--config", str(CONFIG_7B), f"model.path={HOME_7B}", *EIGHT_GPUS)
    assert proc.returncode == 0, proc.stderr
    assert seconds < ANSWER_S, seconds
    assert "host RAM needed:" in proc.stdout and "ZeRO stage 3" in proc.stdout
    proc, _ = plan_cli("--config", str(CONFIG_7B), f"model.path={HOME_7B}", *EIGHT_GPUS, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fits"] is True and out["advice"] == []
    assert {a["role"] for a in out["actors"]} >= {"learner", "rollout", "reward", "driver", "host node 0"}
    for a in out["actors"]:
        assert set(a) == {"role", "count", "device", "predicted_gib", "available_gib", "fits"}


def test_cli_refuses_in_one_line_naming_the_knob(counted_7b):
    proc, seconds = plan_cli("--config", str(CONFIG_7B), f"model.path={HOME_7B}", *EIGHT_GPUS,
                             "learner.micro_batch_size=64", "learner.gradient_checkpointing=false")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert seconds < ANSWER_S, seconds
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory plan: learner needs "), proc.stderr
    assert "has 72.0 GiB (cuda)" in lines[0] and "learner.micro_batch_size" in lines[0]  # 90% of an 80 GiB GPU
    proc, _ = plan_cli("--config", str(CONFIG_7B), "model.path=/no/such/folder", *EIGHT_GPUS)
    assert proc.returncode == 2 and "model.path=/no/such/folder: no config.json" in proc.stderr


def test_sft_and_router_stage_configs_are_planned_too(tiny_model, tiny_home):
    from home_rl.router.config import EvaluateConfig, RouterStageConfig
    from home_rl.trainer.sft import SFTConfig

    sft = load_config(SFTConfig, [f"model.path={tiny_model('qwen2')}", "learner.num_learners=2"])
    plan = plan_for_config(sft)
    assert plan.fits and plan.zero_stage == 0 and [a.role for a in plan.actors] == ["learner", "driver", "host node 0"]
    for schema in (RouterStageConfig, EvaluateConfig):
        cfg = load_config(schema, [f"checkpoint={tiny_home('qwen2')}"])
        roles = [a.role for a in plan_for_config(cfg).actors]
        assert roles == ["rollout", "router trainer", "reward", "driver", "host node 0"], roles


def test_gpus_of_unknown_memory_are_not_planned_and_auto_stays_at_zero_3():
    unknown = memory_plan.Cluster([memory_plan.Node(8, 0.0, 1000.0)], "a Ray cluster")  # Ray reports no GPU memory
    plan = plan_for_config(config_7b(), cluster=unknown)
    assert plan.zero_stage == 3 and plan.fits
    assert {a.role for a in plan.actors} >= {"driver", "host node 0"} and "learner" not in {a.role for a in plan.actors}
    assert any("memory is unknown" in n for n in plan.notes)


def test_a_token_budget_sizes_the_micro_batch_and_is_the_knob_named():
    run = config_7b("learner.max_tokens_per_micro_batch=12288").memory_run()
    assert memory_plan.micro_batch_shape(run.learner, run) == (2, 6144, 2048)  # two 6144-token rows fit the budget
    run = config_7b("learner.max_tokens_per_micro_batch=1000").memory_run()
    assert memory_plan.micro_batch_shape(run.learner, run)[0] == 1  # a longer sequence runs alone
    cfg = config_7b("learner.max_tokens_per_micro_batch=98304")
    with pytest.raises(ConfigError, match=r"lower learner.max_tokens_per_micro_batch \(now 98304\)"):
        memory_plan.check_memory(cfg, HOME_7B, cluster=described_cluster(1, 8, 80, 1000))


def test_shared_prefix_rows_add_their_attention_mask():
    """7B config: prompts of 4096 tokens, 2048-token responses, n=8, micro-batches of 2 sequences."""
    run = config_7b().memory_run()
    assert run.learner.shared_prefix
    assert memory_plan.shared_row_shape(run.learner, run) == (1, 4096 + 2 * 2048)  # one prompt and 2 responses
    wide = config_7b("learner.micro_batch_size=16").memory_run()
    assert memory_plan.shared_row_shape(wide.learner, wide) == (2, 4096 + 8 * 2048)  # 2 prompts and all 8 each
    budget = config_7b("learner.max_tokens_per_micro_batch=20480").memory_run()
    assert memory_plan.shared_row_shape(budget.learner, budget) == (1, 4096 + 8 * 2048)
    shape = memory_plan.model_shape(HOME_7B)
    shared = memory_plan.learner_parts(shape, wide.learner, 3, 2, wide)
    assert shared["attention_mask"] == pytest.approx(2 * (4096 + 8 * 2048) ** 2 * 3 / 2 ** 30)  # bool + bf16 copy
    unshared = config_7b("learner.micro_batch_size=16", "learner.shared_prefix=false").memory_run()
    parts = memory_plan.learner_parts(shape, unshared.learner, 3, 2, unshared)
    assert "attention_mask" not in parts and {k: v for k, v in shared.items() if k != "attention_mask"} == parts


def test_auto_has_one_resolver_and_plan_takes_a_number(caplog):
    shape = model_shape(HOME_7B, "think", ["think_ref=think"])
    run, roomy = config_7b().memory_run(), described_cluster(1, 8, 141, 2000)
    assert memory_plan.resolve_zero_stage(2) == 2 and memory_plan.resolve_zero_stage(0, lambda s: 1 / 0) == 0
    with caplog.at_level("INFO", logger="home_rl.memory_plan.zero_stage"):
        assert memory_plan.resolve_zero_stage("auto") == 3  # no plan (a learner group built in code): ZeRO-3
    assert "with no memory plan" in caplog.text
    tried = []

    def plan_at(stage: int):
        tried.append(stage)
        return memory_plan.plan(shape, run, roomy, stage)

    stage = memory_plan.resolve_zero_stage("auto", plan_at)
    assert tried == list(range(stage + 1)) and stage == plan_for_config(config_7b(), cluster=roomy).zero_stage
    with pytest.raises(ValueError, match="resolve_zero_stage"):
        memory_plan.plan(shape, run, roomy, None)  # the learners' stage is resolved before planning, not inside


def test_each_recipe_config_says_what_it_runs():
    from home_rl.router.config import EvaluateConfig, RouterStageConfig
    from home_rl.trainer.sft import SFTConfig

    grpo = config_7b().memory_run()
    assert grpo.embedded_home and grpo.exports_view and grpo.learner is not None and grpo.rollout is not None
    assert grpo.reward_workers == 8 and grpo.response_tokens == 2048 and grpo.model_path == str(HOME_7B)
    sft = load_config(SFTConfig, [f"model.path={HOME_7B}"]).memory_run()
    assert sft.learner is not None and sft.rollout is None and not sft.embedded_home and sft.reward_workers == 0
    assert RouterStageConfig(labels_path="labels.jsonl").memory_run().rollout is None  # labels given: no rollouts
    for run in (RouterStageConfig().memory_run(), EvaluateConfig().memory_run()):
        assert run.router_trainer and run.rollout is not None and run.learner is None


def test_the_plan_places_actors_by_the_resource_checks_rule():
    """home_rl.cluster.first_fit places both: in the order given, the first node with room; the resource check
    refuses what fits nowhere, the plan counts it on the driver's node (0)."""
    from home_rl.cluster import first_fit

    nodes = [{"GPU": 3.0}, {"GPU": 1.0}]
    assert first_fit([{"GPU": 1}] * 2 + [{"GPU": 2}], nodes) == [0, 0, None]
    assert first_fit([{"GPU": 2}] + [{"GPU": 1}] * 2, nodes) == [0, 0, 1]  # largest first: all placed
    assert first_fit([{"GPU": 1}] * 2 + [{"GPU": 2}, {"GPU": 0}], nodes, fallback=0) == [0, 0, 0, 1]
    cfg = config_7b()
    plan = plan_for_config(cfg, cluster=described_cluster(2, 4, 80, 200))
    # 4 learners fill node 0's GPUs, the 4 rollout workers node 1's; the reward workers and the driver stay on node 0
    estimates = memory_plan.estimates
    shape = model_shape(HOME_7B, "think", ["think_ref=think"])
    loading = memory_plan.learner_parts(shape, cfg.learner, 3, 2, cfg.memory_run())["loading"]
    # learner rank 0 also keeps the think expert's versions for the engines, in host memory
    staged = cfg.memory_run().staged_versions * shape.trainable * 2 / 2**30 + estimates.WEIGHT_SENDER_GIB
    node0 = 4 * (estimates.LEARNER_BASELINE_GIB + loading) + max(0.0, staged - loading) + 8 * estimates.REWARD_WORKER_GIB
    assert actor(plan, "host node 0").predicted_gib == pytest.approx(node0 + actor(plan, "driver").predicted_gib)
    node1 = 4 * (estimates.ROLLOUT_BASELINE_GIB + actor(plan, "rollout").parts["weights"])
    assert actor(plan, "host node 1").predicted_gib == pytest.approx(node1)
