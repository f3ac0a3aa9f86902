"""The router stage: labels from rollouts of both experts, the router trainer, and the hybrid evaluation.

    home_rl.router.labels     the label rule and per-prompt stats (pure)
    home_rl.router.features   pooled prompt features through HomeModel.router_features
    home_rl.router.trainer    fit_router (CE on expected-gain or 0/1 targets, validation split, early stopping) and the RouterTrainer actor
    home_rl.trainer.router_stage      train_router(cfg): the driver of recipes/train_router.py
    home_rl.trainer.evaluate   evaluate(cfg): the driver of recipes/evaluate.py, and the report
"""
from home_rl.router.config import (EvaluateConfig, LabelConfig, RouterActorConfig, RouterStageConfig,
                                   RouterTrainConfig, SyntheticMixConfig, TypeRouterConfig)
from home_rl.router.labels import ExpertStats, derive_label, expert_stats, label_record, read_labels, write_labels

__all__ = ["EvaluateConfig", "LabelConfig", "RouterActorConfig", "RouterStageConfig", "RouterTrainConfig",
           "SyntheticMixConfig", "TypeRouterConfig", "ExpertStats", "derive_label", "expert_stats", "label_record",
           "read_labels", "write_labels"]
