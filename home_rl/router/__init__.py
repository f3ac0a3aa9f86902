"""The router's side of the router stage: the label rule, the router's features, its fit and the HOME model's actor.

    home_rl.router.labels     the label rule and per-prompt stats (pure)
    home_rl.router.features   pooled prompt features through HomeModel.router_features
    home_rl.router.trainer    fit_router (CE on expected-gain or 0/1 targets, validation split, early stopping)
    home_rl.router.actor      HomeModelActor: holds the HOME model, exports expert views, computes router features, fits the router
    home_rl.router.operating_point  the threshold on P(think) that router.budget asks for, and one per reasoning_effort (pure)
    home_rl.router.oracle     what a routing earns per prompt; the hindsight and cross-fitted oracles (pure)

The drivers that use them live in home_rl/trainer/: router_stage.py (recipes/train_router.py) and
evaluate.py (recipes/evaluate.py).
"""
from home_rl.router.config import (EvaluateConfig, LabelConfig, RouterActorConfig, RouterStageConfig,
                                   RouterTrainConfig, SyntheticMixConfig, TypeRouterConfig)
from home_rl.router.labels import ExpertStats, derive_label, expert_stats, label_record, read_labels, write_labels

__all__ = ["EvaluateConfig", "LabelConfig", "RouterActorConfig", "RouterStageConfig", "RouterTrainConfig",
           "SyntheticMixConfig", "TypeRouterConfig", "ExpertStats", "derive_label", "expert_stats", "label_record",
           "read_labels", "write_labels"]
