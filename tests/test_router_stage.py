"""The router stage and the hybrid evaluation end to end on a tiny Qwen2.5-VL with image prompts.

Real Ray, real vLLM engines for both views, real reward workers; the run is conftest's `stage_run` (made by
tests/router_runs.py, shared with the serving tests). Its reward pays think samples on math only: the labels must
then come out think on exactly the math rows, which checks that each expert's samples are scored as that expert's.
"""
from __future__ import annotations

import json

import pytest


def test_labels_come_from_both_experts_rollouts(stage_run):
    records = [json.loads(line) for line in (stage_run["out"] / "labels.jsonl").read_text().splitlines()]
    assert sorted(r["data_source"] for r in records) == ["math", "math", "ocr", "ocr", "vqa", "vqa"]
    for r in records:
        for key in ("acc_think", "acc_fast", "len_think", "len_fast", "gain", "threshold", "margin", "length_cost",
                    "max_response_tokens", "scores_think", "scores_fast", "tokens_think", "tokens_fast", "type_label"):
            assert key in r, key
        assert len(r["scores_think"]) == len(r["tokens_fast"]) == 2
        assert r["label"] == ("think" if r["data_source"] == "math" else "fast")
        assert r["acc_think"] == (1.0 if r["data_source"] == "math" else 0.0) and r["acc_fast"] == 0.0
    summary = json.loads((stage_run["out"] / "router_metrics.json").read_text())
    assert summary["fit"]["class_counts"] == {"fast": 4, "think": 2}
    # the default fit target: the expected net gain, whose value for the labels is checkable by hand
    assert summary["fit"]["target"] == "expected_gain"
    assert summary["fit"]["label_net_gain"] == pytest.approx(
        sum(r["gain"] - r["threshold"] for r in records if r["label"] == "think") / len(records))
    assert summary["labels"]["by_source"]["math"]["think_ratio"] == 1.0
    assert (stage_run["out"] / "metrics.jsonl").read_text().count("\n") == summary["fit"]["epochs"]
    assert not (stage_run["out"] / "views").exists()  # the exported views are removed after use


def test_router_training_changes_only_router_tensors(stage_run):
    import torch
    from safetensors.torch import load_file

    from home_rl.model import HomeModel

    before = load_file(stage_run["home"] / "model.safetensors")
    after = load_file(stage_run["final"] / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("router.") for k in changed)
    trained = HomeModel.from_pretrained(stage_run["final"])
    assert trained.home_config["router_trained"]["class_counts"] == {"fast": 4, "think": 2}
    assert trained.arch.multimodal
    # the operating point (router.budget's default, accuracy=1), calibrated on the prompts the fit held out; 6
    # prompts of 6 kinds leave none to hold out, so on all of them
    point = trained.home_config["router_operating_point"]
    assert point["budget"] == "accuracy=1" and point["split"] == "all" and point["prompts"] == 6
    assert point["measured"]["accuracy"] >= point["always_think"]["accuracy"] - 0.01
    assert point["efforts"]["low"] >= point["efforts"]["medium"] == point["threshold"] >= point["efforts"]["high"]
    # the router's input: the (layer, pooling) of the lowest validation loss (training loss here: nothing held out)
    metrics = json.loads((stage_run["out"] / "router_metrics.json").read_text())
    table = metrics["input_selection"]
    assert {(r["layer"], r["pooling"]) for r in table} == {(0, "mean"), (0, "last"), (1, "mean"), (1, "last")}
    assert all(r["val_loss"] is None for r in table)
    best = min(table, key=lambda r: r["train_loss"])
    assert (trained.home_config["router_layer"], trained.home_config["router_pooling"]) == (best["layer"], best["pooling"])
    assert trained.home_config["router_trained"]["layer"] == best["layer"]


def test_hybrid_report_side_by_side(stage_run):
    report = json.loads((stage_run["eval"] / "report.json").read_text())
    for policy in ("hybrid", "always_think", "always_fast", "oracle", "type_labels"):
        assert {"all", "math", "ocr", "vqa"} <= set(report[policy]), policy
        for values in report[policy].values():
            assert set(values) == {"accuracy", "think_ratio", "mean_tokens", "prompts", "gap_recovered", "token_ratio"}
    assert report["always_think"]["all"]["think_ratio"] == 1.0 and report["always_fast"]["all"]["think_ratio"] == 0.0
    assert report["always_think"]["math"]["accuracy"] == 1.0 and report["always_fast"]["all"]["accuracy"] == 0.0
    # the oracle thinks exactly where it pays: on math, and nowhere else
    assert report["oracle"]["math"]["think_ratio"] == 1.0 and report["oracle"]["ocr"]["think_ratio"] == 0.0
    assert report["oracle"]["all"]["accuracy"] == report["always_think"]["all"]["accuracy"]
    assert report["oracle"]["ocr"]["mean_tokens"] == report["always_fast"]["ocr"]["mean_tokens"]
    # the evaluation's math rows (seed 1) have 2 and 6 steps: both are broken out, and the >= 3 group
    assert {"math@steps=2", "math@steps=6", "math@steps>=3"} <= set(report["hybrid"])
    assert report["hybrid"]["math@steps>=3"]["prompts"] == 1
    assert "type labels" in (stage_run["eval"] / "report.md").read_text()
    assert (stage_run["eval"] / "report.png").stat().st_size > 1000
    # the trade-off: the router at every threshold, random routing, the group frontier, the operating point
    threshold = report["info"]["operating_point"]["threshold"]
    assert report["pareto"]["operating_point"]["threshold"] == threshold
    assert report["pareto"]["operating_point"]["accuracy"] == report["hybrid"]["all"]["accuracy"]
    curve = report["pareto"]["router"]
    assert curve[0]["think_ratio"] == 0 and curve[-1]["think_ratio"] == 1
    assert curve[-1]["accuracy"] == report["always_think"]["all"]["accuracy"]
    front = report["group_frontier"]["points"]
    assert front[-1]["accuracy"] == 1 / 3 and {"math@steps=2", "math@steps=6"} <= set(front[-1]["think_groups"])
    assert all(a["mean_tokens"] < b["mean_tokens"] and a["accuracy"] < b["accuracy"] for a, b in zip(front, front[1:]))
    assert (stage_run["eval"] / "pareto.png").stat().st_size > 1000
    # 4 sampled answers per prompt and expert: think always pays on math, so both oracles recover the whole gap
    sampled = report["sampled"]
    assert sampled["oracle_cross_fitted"]["all"]["accuracy"] == sampled["always_think"]["all"]["accuracy"] == 1 / 3
    assert sampled["oracle_cross_fitted"]["math"]["gap_recovered"] == 1.0 and sampled["oracle"]["ocr"]["think_ratio"] == 0
    assert report["hybrid"]["all"]["token_ratio"] <= 1.0
    samples = [json.loads(line) for line in (stage_run["eval"] / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["responses_think"]) == 2 for s in samples)
