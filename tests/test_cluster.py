"""Placement on a Ray cluster: node labels, fail-fast resource checks, lost rollout workers, manifests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from home_rl.cluster import Bundle, ClusterConfig, ClusterResourceError, shortage
from home_rl.learner.config import LearnerConfig
from home_rl.resources import Resources
from home_rl.rollout import RolloutConfig, RolloutPool
from home_rl.trainer.startup import job_placement
from home_rl.weights import WeightSender

REPO = Path(__file__).resolve().parents[1]


def test_shortage_names_what_is_missing():
    nodes = [{"CPU": 8.0, "GPU": 4.0, "learner": 1.0}, {"CPU": 8.0}]
    learners = [Bundle({"CPU": 1, "GPU": 1, "learner": 0.001}, f"learner {i}", "learner.*") for i in range(4)]
    assert shortage(learners, nodes) is None
    message = shortage(learners + [Bundle({"CPU": 1, "GPU": 2}, "rollout worker 0", "rollout.*")], nodes)
    assert "GPU: 6 needed, the cluster has 4" in message
    # the default job on a 2-core `ray start --head`: the message gives the flag that fixes it
    message = shortage([Bundle({"CPU": 1}, f"learner {i}", "learner.*") for i in range(3)]
                       + [Bundle({"CPU": 0.5}, "reward worker 0", "reward.*")], [{"CPU": 2.0}])
    assert "CPU: 3.5 needed, the cluster has 2 (on one machine: ray start --head --num-cpus 4)" in message
    message = shortage([Bundle({"CPU": 1, "rollout": 0.001}, "rollout worker 0", "rollout.*")], nodes)
    assert "rollout: no node has it" in message and "ray start --resources" in message
    # enough in total, but no single node holds a 10-CPU bundle
    message = shortage([Bundle({"CPU": 10}, "learner 0", "learner.*")], nodes)
    assert message.startswith("no node has room for learner 0")


def test_a_config_the_cluster_cannot_host_fails_fast_naming_the_resources(ray_local):
    groups_before = set(ray_local.util.placement_group_table())
    with pytest.raises(ClusterResourceError) as error:
        job_placement(ClusterConfig(resource_wait_s=2), learner=LearnerConfig(num_learners=2, device="cuda"),
                      rollout=RolloutConfig(num_workers=3, resources=Resources(gpus=2, node_resource="rollout")))
    message = str(error.value)
    assert "waited 2 s" in message  # failed after resource_wait_s, not after a placement group timed out
    assert "GPU: no node has it" in message and "rollout: no node has it" in message
    assert "rollout.resources.gpus" in message and "learner.device" in message
    with pytest.raises(ClusterResourceError, match="must equal learner.num_learners"):
        job_placement(ClusterConfig(mode="colocated"), learner=LearnerConfig(num_learners=2),
                      rollout=RolloutConfig(num_workers=1))
    assert set(ray_local.util.placement_group_table()) == groups_before  # nothing was reserved


def test_colocated_pairs_share_a_bundle(ray_local):
    import ray

    placement = job_placement(ClusterConfig(mode="colocated"), learner=LearnerConfig(num_learners=2, device="cpu"),
                              rollout=RolloutConfig(num_workers=2, resources=Resources(cpus=0.5)))
    try:
        assert placement.rollout_group is None and placement.learner_group is not None
        table = ray.util.placement_group_table(placement.learner_group)
        assert list(table["bundles"].values()) == [{"CPU": 1.5}, {"CPU": 1.5}]  # learner + rollout worker each
        for rank in (0, 1):
            learner, rollout = placement.learner_options(rank), placement.rollout_options(rank)
            assert learner["scheduling_strategy"].placement_group_bundle_index == rank
            assert rollout["scheduling_strategy"].placement_group_bundle_index == rank
            assert rollout["scheduling_strategy"].placement_group.id == learner["scheduling_strategy"].placement_group.id
    finally:
        placement.shutdown()


def test_the_job_cli_fails_before_any_actor_starts_on_missing_resources(tiny_home, tmp_path):
    # how long this takes is measured by benchmarks/fail_fast.py, not asserted here
    home = tiny_home("qwen2")
    proc = subprocess.run([sys.executable, str(REPO / "recipes/grpo_think.py"), f"model.path={home}",
                           f"output_dir={tmp_path / 'run'}", "synthetic_rows=8", "data.prompts_per_step=4",
                           "rollout.resources.gpus=8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GPU: no node has it" in proc.stderr and "rollout.resources.gpus" in proc.stderr
    assert "waited 10 s: cluster.resource_wait_s" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the rollout pool exports the think view before its engines start: the check came first
    assert not (tmp_path / "run" / "views").exists()


def test_a_dead_rollout_worker_is_restarted_at_the_current_weights(tiny_model, ray_local):
    view = tiny_model("qwen2")
    cfg = RolloutConfig(num_workers=2, n=2, max_response_tokens=8, dtype="float32", kv_cache_gib=0.25,
                        max_model_len=256, stop=[])
    name = "model.norm.weight"
    pool = None
    try:
        state = {}
        from safetensors.torch import load_file

        state = load_file(view / "model.safetensors")
        changed = {name: state[name] * 1.5}  # a real weight change: the samples differ from the view on disk
        pool = RolloutPool(str(view), cfg)
        pool.attach(WeightSender())  # in a run: learner rank 0, which keeps the engines' version for a refill
        prompts = [{"prompt_token_ids": [5 + i, 17, 42, 9 + i]} for i in range(4)]
        pool.sender.stage(1, changed.items())
        pool.sync(1)
        before = pool.generate(prompts, seed=3)

        os.kill(pool.info[1]["pid"], signal.SIGKILL)  # a lost worker: its share is issued again
        after = pool.generate(prompts, seed=3)
        assert after.stats["worker_restarts"] == 1 and pool.restarts == 1
        assert [[s.response_ids for s in g] for g in after.samples] == [[s.response_ids for s in g] for g in before.samples]
        assert torch.equal(pool.engine_tensors([name], rank=1)[name], changed[name].to(torch.float32))

        os.kill(pool.info[0]["pid"], signal.SIGKILL)  # lost during a weight update: restarted, update completed
        pool.sender.stage(2, changed.items())
        report = pool.sync(2)
        assert report["version"] == 2 and pool.restarts == 2
        assert all(torch.equal(pool.engine_tensors([name], rank=r)[name], changed[name]) for r in (0, 1))
    finally:
        if pool is not None:
            pool.sender.shutdown()
            pool.shutdown()


@pytest.mark.slow
def test_job_on_labelled_nodes_survives_a_lost_worker_and_a_new_worker_count(tiny_home, tmp_path):
    """Two Ray nodes (learner, rollout) on this machine; actors read back from Ray's state API."""
    home = tiny_home("qwen2")
    proc = subprocess.run([sys.executable, str(REPO / "tests/cluster_job.py"), str(home), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    nodes = report["nodes"]
    for phase in ("first", "second"):
        actors = report[phase]
        assert actors["LearnerWorker"] and set(actors["LearnerWorker"]) == {nodes["learner"]}, phase
        assert actors["RolloutWorker"] and set(actors["RolloutWorker"]) == {nodes["rollout"]}, phase
    assert len(report["first"]["RolloutWorker"]) == 1 and len(report["second"]["RolloutWorker"]) == 2
    assert report["resumed_at"] == 1  # resumed from the step-1 checkpoint with another worker count
    metrics = report["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # step 2 again after the resume, then 3
    assert [m["rollout/worker_restarts"] for m in metrics] == [0, 1, 0]
    # resumed asynchronous from a synchronous checkpoint: step 2 on version 1's rollouts, step 3 on them too
    assert [m["async/staleness_max"] for m in metrics] == [0, 0, 1]
    assert report["victim"] not in report["rollout_pids"]


# ----------------------------------------------------------------------------- cluster/ manifests


def test_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster/aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: provider defaults, then Ray's JSON schema
    types = config["available_node_types"]
    labels = [set(t.get("resources", {})) for t in types.values()]
    assert {"rollout"} in labels and {"learner"} in labels


def test_kuberay_rayjob_manifest_has_the_required_fields():
    job = yaml.safe_load((REPO / "cluster/kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "recipes/grpo_think.py" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"rollout", "learner"} <= set(groups)
    for name, group in groups.items():
        resources = json.loads(group["rayStartParams"]["resources"])  # KubeRay's quoted JSON: a JSON string
        assert name in json.loads(resources)
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    runtime_env = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] and "env_vars" in runtime_env


def test_production_config_loads_with_its_placement():
    from home_rl.config import load_config
    from home_rl.trainer.grpo_think import GRPOThinkConfig

    cfg = load_config(GRPOThinkConfig, ["--config", str(REPO / "recipes/configs/qwen2_5_vl_7b_8gpu.yaml"),
                                        "--config", str(REPO / "recipes/configs/two_nodes.yaml")])
    # the layered file's values win: its mode, wait and counts (the 8-GPU file alone has 4 workers, 4 learners)
    assert cfg.cluster.mode == "disaggregated" and cfg.cluster.resource_wait_s == 900
    assert cfg.rollout.num_workers == 8 and cfg.learner.num_learners == 8 and cfg.rollout.resources.gpus == 1
    assert cfg.rollout.resources.node_resource == "rollout" and cfg.learner.resources.node_resource == "learner"
