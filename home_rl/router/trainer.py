"""Fitting the router on labelled prompts (home_rl/router/actor.py's HomeModelActor runs it beside the model).

The router is a small MLP over pooled prompt features, so its training is tiny once the features
exist: they are computed once (no grad, the model's own forward up to the router's layer), then
the router alone is fitted with cross-entropy, a stratified validation split and early stopping on
the validation loss.

What it fits (router.target):
    expected_gain  soft targets P(think) = clip(0.5 + net_gain / 2, 0, 1), net_gain = acc_think - acc_fast
                   - threshold of the label rule. Cross-entropy is minimised where the router's P(think)
                   is the mean target of prompts that look alike, so it picks think (P > 0.5) exactly where
                   their mean net gain is positive: the label rule applied to expected accuracies.
    label          the 0/1 labels, class-weighted. One greedy sample per expert makes most hard prompts a
                   tie (both wrong) and so fast, even where think solves a fifth of them and fast none:
                   the label majority is not where thinking pays.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from home_rl.errors import HomeRLError
from home_rl.experts import EXPERTS
from home_rl.model.router import Router
from home_rl.router.config import RouterTrainConfig

log = logging.getLogger(__name__)

CLASSES = EXPERTS  # label index -> expert (the router's logit order)


class EmptyLabelSetError(HomeRLError):
    """No labelled prompt to fit the router on."""


@dataclasses.dataclass
class FitResult:
    state: dict  # the fitted router's state dict (fp32, CPU), the best validation epoch's weights
    metrics: dict  # sizes, class counts and weights, best epoch, accuracies
    history: list  # one dict per epoch: train/val loss and accuracy
    val_index: list  # the prompts held out for validation (what the operating point is calibrated on)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int,
                  strata: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices: about val_fraction of each class held out, at least one kept for
    training. With `strata` (a kind per prompt, e.g. its data source and step count), of each kind and class:
    early stopping then judges the fit on the same mix of prompts it is fitted on."""
    keys = labels if strata is None else np.array([f"{kind}|{y}" for kind, y in zip(strata, labels)])
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(keys):
        idx = rng.permutation(np.flatnonzero(keys == c))
        n_val = min(int(math.floor(val_fraction * len(idx) + 0.5)), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.array(sorted(train), dtype=int), np.array(sorted(val), dtype=int)


def class_weight_vector(labels: np.ndarray, how: str, target: str = "label") -> torch.Tensor:
    """Cross-entropy weights per class: 'balanced' gives N / (present classes * count); absent classes get 1.
    'auto' is balanced for hard labels and none for expected-gain targets: weighting soft targets would
    move the decision from "mean net gain > 0" to "mean target above the set's average"."""
    weights = torch.ones(len(CLASSES))
    if how == "none" or (how == "auto" and target == "expected_gain"):
        return weights
    counts = np.bincount(labels, minlength=len(CLASSES))
    present = int((counts > 0).sum())
    for c, count in enumerate(counts):
        if count:
            weights[c] = len(labels) / (present * count)
    return weights


@contextlib.contextmanager
def _one_thread():
    """Matrices of a few hundred rows: OpenMP's thread hand-offs cost more than the math (40x on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_router(features: torch.Tensor, labels: Sequence[int], cfg: RouterTrainConfig, router_hidden: int,
               init_state: Optional[dict] = None, net_gains: Optional[Sequence[float]] = None,
               strata: Optional[Sequence[str]] = None) -> FitResult:
    """Fit a router (fresh, or from `init_state`) on [N, hidden] features and 0/1 labels (0 fast, 1 think).

    `net_gains` (per prompt: think's accuracy gain minus the label rule's threshold) are what
    cfg.target=expected_gain fits; with them the metrics also report the net gain the routing earns.
    `strata` (a kind per prompt) stratify the validation split beside the labels."""
    with _one_thread():
        return _fit(features, labels, cfg, router_hidden, init_state, net_gains, strata)


def soft_targets(net_gains: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """[N, 2] (fast, think) probabilities: P(think) = 0.5 + net_gain / 2, clipped to [0, 1] (a tie: 0.5, and
    the router's argmax gives an exact tie to fast)."""
    think = (0.5 + 0.5 * torch.as_tensor(net_gains, dtype=torch.float32)).clamp(0.0, 1.0)
    return torch.stack([1.0 - think, think], dim=1)


def _fit(features: torch.Tensor, labels: Sequence[int], cfg: RouterTrainConfig, router_hidden: int,
         init_state: Optional[dict], net_gains: Optional[Sequence[float]], strata: Optional[Sequence[str]]) -> FitResult:
    y_all = np.asarray(list(labels), dtype=int)
    if len(y_all) == 0:
        raise EmptyLabelSetError("the labelled set is empty: there is no prompt to train the router on "
                                 "(check the data and that the rollouts produced samples for both experts)")
    if features.shape[0] != len(y_all):
        raise ValueError(f"{features.shape[0]} feature rows for {len(y_all)} labels")
    if bad := sorted(set(y_all.tolist()) - {0, 1}):
        raise ValueError(f"router labels must be 0 (fast) or 1 (think), got {bad}")
    for name, values in (("net gains", net_gains), ("strata", strata)):
        if values is not None and len(values) != len(y_all):
            raise ValueError(f"{len(values)} {name} for {len(y_all)} labels")
    if cfg.target == "expected_gain" and net_gains is None:
        raise HomeRLError("router.target=expected_gain needs each prompt's net gain (labels with gain and "
                          "threshold, as the router stage writes them); these labels have none: use router.target=label")
    counts = {name: int((y_all == c).sum()) for c, name in enumerate(CLASSES)}
    single = sum(v > 0 for v in counts.values()) == 1
    if single:
        only = next(name for name, v in counts.items() if v)
        log.warning("the labelled set has a single class: all %d prompts are labelled %s, so the router learns "
                    "to always pick %s (check labels.margin / labels.length_cost, or the data's mix)",
                    len(y_all), only, only)

    train_idx, val_idx = split_indices(y_all, cfg.val_fraction, cfg.seed, strata)
    x = features.float()
    y = torch.as_tensor(y_all)
    # What the loss compares the logits to: class indices, or (fast, think) probabilities.
    gains = torch.as_tensor(net_gains, dtype=torch.float32) if net_gains is not None else None
    targets = soft_targets(gains) if cfg.target == "expected_gain" else y
    weights = class_weight_vector(y_all[train_idx], cfg.class_weights, cfg.target)

    torch.manual_seed(cfg.seed)
    router = Router(x.shape[1], router_hidden).float()
    if init_state is not None:
        router.load_state_dict({k: v.float() for k, v in init_state.items()})
    optimizer = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_rng = torch.Generator().manual_seed(cfg.seed)

    def evaluate(idx: np.ndarray) -> dict:
        """Loss against the fitted targets; accuracy against the labels; the net gain the picks earn
        (mean over prompts of net_gain where think is picked: what routing adds to always-fast)."""
        if len(idx) == 0:
            return {}
        router.eval()
        with torch.no_grad():
            logits = router(x[idx])
        pred, ys = logits.argmax(1), y[idx]
        recalls = [float((pred[ys == c] == c).float().mean()) for c in range(len(CLASSES)) if (ys == c).any()]
        out = {"loss": float(F.cross_entropy(logits, targets[idx], weight=weights)),
               "acc": float((pred == ys).float().mean()), "balanced_acc": float(np.mean(recalls)),
               "think_ratio": float(pred.float().mean())}
        if gains is not None:
            out["net_gain"] = float((gains[idx] * pred).mean())
            out["label_net_gain"] = float((gains[idx] * ys).mean())  # what the labels themselves earn
        return out

    history, best, best_state, best_epoch, waited = [], math.inf, copy.deepcopy(router.state_dict()), 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        router.train()
        perm = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=order_rng)]
        for start in range(0, len(perm), cfg.batch_size):
            part = perm[start:start + cfg.batch_size]
            loss = F.cross_entropy(router(x[part]), targets[part], weight=weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_m, val_m = evaluate(train_idx), evaluate(val_idx)
        history.append({"epoch": epoch, **{f"train/{k}": v for k, v in train_m.items()},
                        **{f"val/{k}": v for k, v in val_m.items()}})
        watched = (val_m or train_m)["loss"]  # no validation rows (a tiny set): stop on the training loss
        if watched < best - cfg.min_delta:
            best, best_state, best_epoch, waited = watched, copy.deepcopy(router.state_dict()), epoch, 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break

    router.load_state_dict(best_state)
    final_train, final_val, final_all = evaluate(train_idx), evaluate(val_idx), evaluate(np.arange(len(y_all)))
    metrics = {
        "target": cfg.target, "prompts": len(y_all), "train_prompts": len(train_idx), "val_prompts": len(val_idx),
        "class_counts": counts, "class_weights": dict(zip(CLASSES, weights.tolist())), "single_class": single,
        "best_epoch": best_epoch, "epochs": len(history), "stopped_early": len(history) < cfg.max_epochs,
        **{f"train/{k}": v for k, v in final_train.items()}, **{f"val/{k}": v for k, v in final_val.items()},
        "label_think_ratio": counts["think"] / len(y_all), "predicted_think_ratio": final_all["think_ratio"],
    }
    if gains is not None:
        metrics.update(net_gain=final_all["net_gain"], label_net_gain=final_all["label_net_gain"])
    return FitResult({k: v.detach().clone() for k, v in best_state.items()}, metrics, history, val_idx.tolist())
