"""Shared by the router-stage and serving tests: the router stage and the hybrid evaluation run once per session
on a tiny Qwen2.5-VL with image prompts (conftest's `stage_run`), giving a HOME checkpoint with a trained router,
its evaluation rows and the evaluation's choices.

A random tiny model never answers correctly, so the reward here is a verifier that pays think samples on math
only: the labels then come out think on exactly the math rows.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve()


def think_pays_on_math(response, ground_truth, *, data_source, extra_info):
    """1 for a think sample of a math row, else 0 (module top kept light: the reward sandbox imports this file)."""
    return float(extra_info.get("expert") == "think" and data_source == "math")


def _cfgs(home: Path, tmp: Path):
    from home_rl.rollout.config import RolloutConfig
    from home_rl.router.config import EvaluateConfig, RouterStageConfig, RouterTrainConfig, SyntheticMixConfig
    from reward.config import VerifierEntry

    verifier = [VerifierEntry(f"{HERE}:think_pays_on_math", 1.0)]
    common = dict(
        rollout=RolloutConfig(n=2, max_response_tokens=8, dtype="float32", kv_cache_gib=0.25, max_model_len=512,
                              stop=[]),
    )
    fit = dict(max_epochs=60, patience=10, lr=1e-2)
    mix = dict(ratio="math=1,ocr=1,vqa=1", image_fraction=1.0)  # 2 prompts per source, math rendered into images
    stage = RouterStageConfig(checkpoint=str(home), output_dir=str(tmp / "router"),
                              synthetic=SyntheticMixConfig(rows=6, seed=0, **mix), router=RouterTrainConfig(**fit),
                              **common)
    evaluation = EvaluateConfig(checkpoint=str(tmp / "router" / "final"), output_dir=str(tmp / "eval"),
                                synthetic=SyntheticMixConfig(rows=6, seed=1, **mix),
                                router=RouterTrainConfig(target="label", **fit), **common)  # type labels: no gains
    for cfg in (stage, evaluation):
        cfg.reward.sources = {s: verifier for s in ("math", "ocr", "vqa")}
        cfg.data.max_prompt_tokens = 400
    evaluation.type_router.data_path = str(tmp / "router" / "data" / "data.jsonl")
    return stage, evaluation


def run_stage(tiny_home, tmp_path_factory) -> dict:
    """Train the router and evaluate it; the paths and report the tests read."""
    from home_rl.trainer.evaluate import evaluate
    from home_rl.trainer.router_stage import train_router

    tmp = tmp_path_factory.mktemp("router_stage")
    home = tiny_home("qwen2_5_vl", router_hidden_size=16)
    stage, evaluation = _cfgs(home, tmp)
    final = train_router(stage)
    report = evaluate(evaluation)
    return {"home": home, "final": Path(final), "out": tmp / "router", "eval": tmp / "eval", "report": report}
