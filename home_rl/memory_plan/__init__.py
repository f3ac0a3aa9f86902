"""Memory you can plan: every actor's peak memory, predicted from the model's config.json and the run's config.

Nothing is loaded and nothing starts: the model is built on the `meta` device (shapes, no storage) to count
its parameters exactly, by what they are to the learner (trainable, frozen, frozen copies such as think_ref,
vision tower), and the run's config says how they are held:

    learner   weights (frozen copies included) in the training dtype, gradients of what trains, AdamW states
              (16-bit training: fp32 master + m + v, 12 bytes a parameter; fp32: m + v, 8 bytes), each divided
              by the ZeRO stage's partitioning over num_learners; under ZeRO-3 the parameters gathered at
              once (at least the largest decoder layer); DeepSpeed's gradient buckets; the activations of the
              largest micro-batch by tokens (with or without gradient checkpointing); the logits of the kept
              positions; a process baseline; and the host RAM of loading (ZeRO-3: the partition + one layer,
              stages 0-2: the whole model)
    rollout   the view's weights, the KV cache (rollout.kv_cache_gib on CPU, gpu_memory_utilization of the GPU
              on GPUs), the vision encoder's buffers, a baseline
    driver    a baseline, plus the export of the think view (the HOME checkpoint loaded once in its own dtype)
    host      per node, everything placed there (home_rl.cluster.first_fit, the resource check's placement rule)

    plan = plan_for_config(cfg)   # cfg.memory_run() says what runs; on this machine, a Ray cluster, or Cluster(...)
    plan.fits, plan.refusal(), plan.zero_stage, [a.predicted_gib for a in plan.actors]

The modules, one concept each:

    nodes       the cluster: its nodes' GPUs and RAM (this machine, a Ray cluster, a description)
    shapes      the model's parameter counts and sizes from config.json (meta device, cached)
    run         Run: what a recipe's config runs (each config's memory_run() returns one)
    estimates   one learner's and one rollout engine's bytes, part by part, and the constants behind them
    advice      the knobs named when something does not fit; lengths that cannot work
    report      ActorPlan, MemoryPlan: the result and how it prints
    zero_stage  resolve_zero_stage: what learner.zero_stage=auto means (the one resolver)
    plan        plan() at one ZeRO stage, plan_for_config, check_memory
"""
from home_rl.memory_plan.advice import host_advice, learner_advice, length_problems
from home_rl.memory_plan.estimates import (kv_bytes_per_token, learner_parts, micro_batch_shape, rollout_parts,
                                           shared_row_shape)
from home_rl.memory_plan.nodes import (GIB, USABLE, Cluster, Node, current_cluster, described_cluster, local_cluster,
                                       ray_cluster)
from home_rl.memory_plan.plan import check_memory, plan, plan_for_config
from home_rl.memory_plan.report import ActorPlan, MemoryPlan
from home_rl.memory_plan.run import Run
from home_rl.memory_plan.shapes import ModelShape, model_shape, planned_model_dir
from home_rl.memory_plan.zero_stage import ZERO_STAGES, resolve_zero_stage

__all__ = ["ActorPlan", "Cluster", "GIB", "MemoryPlan", "ModelShape", "Node", "Run", "USABLE", "ZERO_STAGES",
           "check_memory", "current_cluster", "described_cluster", "host_advice", "kv_bytes_per_token",
           "learner_advice", "learner_parts", "length_problems", "local_cluster", "micro_batch_shape",
           "model_shape", "plan", "plan_for_config", "planned_model_dir", "ray_cluster", "resolve_zero_stage",
           "rollout_parts", "shared_row_shape"]
