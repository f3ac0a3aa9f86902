"""Fitting the router: expected-gain and label targets, class weights, validation split, early stopping, bad
labelled sets; features and view swaps."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from home_rl.errors import HomeRLError
from home_rl.router.config import RouterTrainConfig
from home_rl.router.trainer import EmptyLabelSetError, class_weight_vector, fit_router, soft_targets, split_indices

REPO = Path(__file__).resolve().parents[1]


def blobs(n_fast: int, n_think: int, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Two well-separated Gaussian clusters: label 1 (think) rows are shifted up on half the axes and down on
    the other half (a shift along every axis alike would vanish in the router's LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    labels = [0] * n_fast + [1] * n_think
    direction = torch.cat([torch.ones(dim // 2), -torch.ones(dim - dim // 2)])
    x = torch.randn(len(labels), dim, generator=g) + 2.0 * torch.tensor(labels, dtype=torch.float32)[:, None] * direction
    return x, labels


def test_fit_learns_separable_labels_and_stops_early():
    x, y = blobs(45, 15)
    fit = fit_router(x, y, RouterTrainConfig(target="label", max_epochs=500, patience=5, lr=1e-2), router_hidden=16)
    m = fit.metrics
    assert m["class_counts"] == {"fast": 45, "think": 15} and not m["single_class"]
    assert m["val_prompts"] == 12 and m["train_prompts"] == 48  # 20% of each class held out: 9 fast + 3 think
    assert m["val/acc"] == 1.0 and m["train/acc"] == 1.0
    assert m["stopped_early"] and m["epochs"] == m["best_epoch"] + 5 and len(fit.history) == m["epochs"]
    # the kept weights are the best epoch's: their validation loss is that epoch's
    assert m["val/loss"] == pytest.approx(fit.history[m["best_epoch"] - 1]["val/loss"], rel=1e-5)
    assert set(fit.state) == {"net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}


def test_class_weights_balance_an_imbalanced_set():
    labels = np.array([0] * 30 + [1] * 10)
    assert class_weight_vector(labels, "balanced").tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    assert class_weight_vector(labels, "none").tolist() == [1.0, 1.0]
    assert class_weight_vector(labels, "auto", "label").tolist() == class_weight_vector(labels, "balanced").tolist()
    assert class_weight_vector(labels, "auto", "expected_gain").tolist() == [1.0, 1.0]
    # a minority class learnt because of its weight: 57 fast vs 3 think, all think rows must still be found
    x, y = blobs(57, 3, seed=1)
    fit = fit_router(x, y, RouterTrainConfig(target="label", max_epochs=300, patience=20, lr=1e-2, val_fraction=0.0),
                     router_hidden=16)
    assert fit.metrics["class_weights"]["think"] == pytest.approx(60 / 6)
    assert fit.metrics["predicted_think_ratio"] == pytest.approx(3 / 60)


def test_split_is_stratified_and_keeps_a_training_row_per_class():
    labels = np.array([0] * 10 + [1] * 2)
    train, val = split_indices(labels, 0.5, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(12))
    assert (labels[val] == 0).sum() == 5 and (labels[val] == 1).sum() == 1
    train, val = split_indices(np.array([1]), 0.5, seed=0)
    assert train.tolist() == [0] and val.tolist() == []  # one row: it trains, nothing to validate on
    # with strata, half of each kind and class: 4 "a" fast, 4 "b" fast, 2 "a" think, 2 "b" think
    labels = np.array([0] * 8 + [1] * 4)
    kinds = ["a", "b"] * 6
    train, val = split_indices(labels, 0.5, seed=0, strata=kinds)
    assert sorted(train.tolist() + val.tolist()) == list(range(12))
    assert sorted((kinds[i], int(labels[i])) for i in val) == [("a", 0), ("a", 0), ("a", 1), ("b", 0), ("b", 0), ("b", 1)]


def test_single_class_trains_with_a_warning(caplog):
    x, y = blobs(12, 0)
    with caplog.at_level(logging.WARNING, logger="home_rl.router.trainer"):
        fit = fit_router(x, y, RouterTrainConfig(target="label", max_epochs=20, patience=5), router_hidden=8)
    assert "single class: all 12 prompts are labelled fast" in caplog.text
    assert fit.metrics["single_class"] and fit.metrics["predicted_think_ratio"] == 0.0


def test_soft_targets_by_hand():
    t = soft_targets([0.95, -0.05, 0.0, -1.05, 1.2])
    assert t[:, 1].tolist() == pytest.approx([0.975, 0.475, 0.5, 0.0, 1.0])  # clipped at both ends
    assert t.sum(1).tolist() == pytest.approx([1.0] * 5)


def test_expected_gain_thinks_where_the_mean_gain_pays_not_where_most_labels_say_think():
    """Cluster A: think alone right on 1 prompt in 5, the rest ties (both wrong): labels are 80% fast, yet the mean
    net gain is 0.2 * 0.95 - 0.8 * 0.05 = +0.15. Cluster B: think alone right on 1 in 10, fast alone on 3 in 10:
    mean net gain 0.1 * 0.95 - 0.3 * 1.05 - 0.6 * 0.05 = -0.25. With a threshold of 0.05 on every prompt."""
    g = torch.Generator().manual_seed(0)
    cluster = [0] * 100 + [1] * 100  # prompts alike within a cluster, as prompts of one type are to the router
    x = torch.randn(2, 16, generator=g)[cluster] + 0.05 * torch.randn(200, 16, generator=g)
    gains, labels = [], []
    for i, c in enumerate(cluster):
        k = i % 10
        gain = (1.0 if k < 2 else 0.0) if c else (1.0 if k == 0 else -1.0 if k <= 3 else 0.0)
        gains.append(gain - 0.05)
        labels.append(int(gain - 0.05 > 0))
    fit = fit_router(x, labels, RouterTrainConfig(max_epochs=300), router_hidden=16, net_gains=gains)
    m = fit.metrics
    assert m["target"] == "expected_gain" and m["class_weights"] == {"fast": 1.0, "think": 1.0}
    assert m["predicted_think_ratio"] == 0.5  # exactly cluster A
    assert m["net_gain"] == pytest.approx(sum(gains[100:]) / 200)  # what thinking on all of A earns, per prompt
    assert m["label_net_gain"] == pytest.approx(sum(g for g, y in zip(gains, labels) if y) / 200)
    # the 0/1 labels, unweighted: the majority of both clusters is fast, so the router never thinks
    hard = fit_router(x, labels, RouterTrainConfig(target="label", class_weights="none", max_epochs=300),
                      router_hidden=16, net_gains=gains)
    assert hard.metrics["predicted_think_ratio"] == 0.0 and hard.metrics["net_gain"] == 0.0


def test_expected_gain_without_gains_is_a_clear_error():
    x, y = blobs(6, 6)
    with pytest.raises(HomeRLError, match="router.target=label"):
        fit_router(x, y, RouterTrainConfig(), router_hidden=8)
    with pytest.raises(ValueError, match="3 net gains for 12 labels"):
        fit_router(x, y, RouterTrainConfig(), router_hidden=8, net_gains=[0.0, 0.1, 0.2])
    # the evaluation's type-label router has data types, never gains: its config says so up front
    from home_rl.router.config import EvaluateConfig

    assert EvaluateConfig().router.target == "label"
    with pytest.raises(HomeRLError, match="router.target must be label here"):
        EvaluateConfig(router=RouterTrainConfig())


def test_empty_label_set_is_a_clear_error():
    with pytest.raises(EmptyLabelSetError, match="the labelled set is empty") as info:
        fit_router(torch.zeros(0, 8), [], RouterTrainConfig(), router_hidden=8)
    assert isinstance(info.value, HomeRLError)  # recipes print it as one line


@pytest.fixture(scope="module")
def tiny_home(tiny_model, tmp_path_factory):
    from home_rl.model import upcycle

    home = upcycle(tiny_model("qwen2"), router_hidden_size=8)
    with torch.no_grad():  # the experts differ, as after GRPO
        for mlp in home.hybrid_mlps:
            for p in mlp.experts["think"].parameters():
                p.add_(0.01)
    return home.save_pretrained(tmp_path_factory.mktemp("router_trainer") / "home")


def test_recipe_errors_are_one_line(tiny_home, tmp_path, monkeypatch, capsys):
    from home_rl.cli import run_recipe
    from home_rl.router.config import EvaluateConfig, RouterStageConfig
    from home_rl.trainer.evaluate import evaluate
    from home_rl.trainer.router_stage import train_router

    # the default checkpoint (the GRPO run's final) is missing here: say what to run
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "train_router.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: checkpoint: no HOME checkpoint at outputs/grpo_think/final: run "
                                   "recipes/grpo_think.py first, or give checkpoint=HOME_DIR")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(evaluate, EvaluateConfig, [])
    assert exit_info.value.code == 2 and "recipes/train_router.py first" in capsys.readouterr().err
    # an empty labelled set
    (tmp_path / "labels.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(train_router, RouterStageConfig, [f"checkpoint={tiny_home}", f"output_dir={tmp_path / 'out'}",
                                                     f"labels_path={tmp_path / 'labels.jsonl'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "is empty" in err and len(err.splitlines()) == 1
    # labels without the numbers behind them cannot give the expected gain: the record is named, and the way out
    (tmp_path / "labels.jsonl").write_text('{"id": "arith-0-000001", "label": "fast"}\n')
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(train_router, RouterStageConfig, [f"checkpoint={tiny_home}", f"output_dir={tmp_path / 'out'}",
                                                     f"labels_path={tmp_path / 'labels.jsonl'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "record 'arith-0-000001' has no gain and threshold" in err
    assert "router.target=label" in err and len(err.splitlines()) == 1


def test_view_swap_sends_exactly_the_think_expert(tiny_home):
    from home_rl.router.actor import HomeModelActor

    trainer = HomeModelActor(str(tiny_home))
    trainer.stage_expert(1, "think")  # what its WeightSender sends the engines serving the fast view
    buckets = trainer.sender.source.versions[1]
    sent = {name: t for bucket in buckets for name, t in bucket}
    think, fast = trainer.home.view_state_dict("think"), trainer.home.view_state_dict("fast")
    differs = {k for k in think if not torch.equal(think[k], fast[k])}
    assert set(sent) == differs and all(".mlp." in k for k in sent)
    assert all(t.dtype == trainer.saved_dtype and torch.equal(t, think[k].to(t.dtype)) for k, t in sent.items())
    assert len(buckets) == len(trainer.home.hybrid_mlps)  # one bucket per layer


def test_batched_features_match_one_prompt_at_a_time(tiny_model, tmp_path):
    """Right padding and batched pixels give every prompt (with or without images) its own features."""
    import transformers

    from data_pipelines import render_prompt
    from data_pipelines.synthetic import generate
    from data_pipelines.readers import read_rows
    from home_rl.model import upcycle
    from home_rl.router.features import compute_features, router_input

    home = upcycle(tiny_model("qwen2_5_vl"), router_layer=1)
    processor = transformers.AutoProcessor.from_pretrained(tiny_model("qwen2_5_vl"))
    rows = read_rows(generate("mix", 5, 0, tmp_path, ratio={"ocr": 1, "extract": 1, "math": 1}, image_fraction=0.5))
    items = [router_input(render_prompt(r, "fast", processor)) for r in rows]
    assert len({len(x["input_ids"]) for x in items}) > 1 and any(x["mm_inputs"] for x in items)
    assert any(not x["mm_inputs"] for x in items)
    batched = compute_features(home, items, batch_size=5)
    alone = torch.cat([compute_features(home, [x]) for x in items])
    assert batched.shape == (5, 64) and torch.allclose(batched, alone, atol=1e-5)
    # every candidate input from one forward pass: the router's own is compute_features', another layer's is what
    # a router reading that layer computes
    from home_rl.router.features import candidate_features

    by = candidate_features(home, items, [(1, "mean"), (0, "mean"), (0, "last")], batch_size=5)
    assert torch.equal(by[(1, "mean")], batched)
    home.home_config.update(router_layer=0, router_pooling="last")
    assert torch.allclose(by[(0, "last")], compute_features(home, items, batch_size=5), atol=1e-6)
    assert not torch.allclose(by[(0, "mean")], by[(0, "last")])
