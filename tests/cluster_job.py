"""A two-node Ray cluster on this machine (a learner node and a rollout node, marked by custom
resources) running the GRPO job on a tiny HOME model; prints one JSON object for test_cluster.py.

    python tests/cluster_job.py HOME_DIR OUT_DIR

Steps 1-2 run with one rollout worker (a checkpoint after step 1); the job is then resumed from
it with two rollout workers, 3 steps and trainer.max_staleness=1, and during the first resumed step one
of them is SIGKILLed. Run as its own process: it owns its Ray
runtime, apart from the test session's.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_grpo_think import tiny_config  # noqa: E402

from home_rl.resources import Resources  # noqa: E402


def actor_nodes() -> dict[str, list[str]]:
    """Node id of every alive actor, per class name, read back from Ray's state API."""
    from ray.util.state import list_actors

    out: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        out.setdefault(actor.class_name, []).append(actor.node_id)
    return out


def main(home: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from home_rl.trainer.grpo_think import GRPOThinkTrainer

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"learner": 1}})
    rollout_node = cluster.add_node(num_cpus=4, resources={"rollout": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = {"learner": ray.get_runtime_context().get_node_id(), "rollout": rollout_node.node_id}
    report: dict = {"nodes": nodes}
    labels = dict(learner__resources=Resources(node_resource="learner"), rollout__resources=Resources(node_resource="rollout"))
    try:
        trainer = GRPOThinkTrainer(tiny_config(Path(home), Path(out), steps=2, **labels))
        try:
            trainer.run()
            report["first"] = actor_nodes()
        finally:
            trainer.shutdown()

        cfg = tiny_config(Path(home), Path(out), steps=3, trainer__resume="auto", **labels)
        cfg.rollout.num_workers = 2
        cfg.trainer.max_staleness = 1  # resumed asynchronous: the worker is lost on the rollout thread
        trainer = GRPOThinkTrainer(cfg)
        try:
            report["resumed_at"] = trainer.step
            victim = trainer.rollout.pool.info[1]["pid"]
            generate = trainer.rollout.pool.generate

            def generate_and_lose_a_worker(*args, **kwargs):  # a real SIGKILL while the first rollout runs
                if not report.get("killed"):
                    report["killed"] = True
                    threading.Timer(0.2, os.kill, (victim, signal.SIGKILL)).start()
                return generate(*args, **kwargs)

            trainer.rollout.pool.generate = generate_and_lose_a_worker
            report["second"] = actor_nodes()
            trainer.run()
            report["rollout_pids"] = [info["pid"] for info in trainer.rollout.pool.info]
            report["victim"] = victim
        finally:
            trainer.shutdown()
        report["metrics"] = [m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
                             if m["step"] > 0]  # step 0: the learnability check
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
