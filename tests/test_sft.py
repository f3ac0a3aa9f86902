"""recipes/sft.py: bad rows, kill and resume=auto, and Stage-SFT of a HOME model with router cross-entropy.

Real Ray (the session cluster; the killed run joins it as a separate driver), real DeepSpeed, tiny models.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipelines import DataConfig, read_rows
from data_pipelines.schema import BadRowError
from home_rl.config import load_config
from home_rl.trainer.sft import SFTConfig, SFTOptions, build_sequences, run_sft
from home_rl.trainer.startup import load_processor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_mix(tmp_path_factory):
    from data_pipelines.synthetic import generate

    return generate("mix", 48, seed=0, out=tmp_path_factory.mktemp("mix"), ratio={"math": 0.5, "extract": 0.5})


def sft_args(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"model.path={model}", "model.dtype=float32", f"data.path={data}", f"output_dir={out}",
            f"trainer.total_steps={steps}", "data.prompts_per_step=4", "learner.lr=1e-3", "learner.micro_batch_size=4",
            "trainer.tensorboard=false", *extra]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return lines


def test_rows_without_a_reference_solution_are_an_error_naming_the_row(tiny_model, text_mix, tmp_path):
    rows = read_rows(text_mix)[:3]
    del rows[1]["solution"]
    bad_id = rows[1]["id"]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SFTConfig, sft_args(tiny_model("qwen2"), data, tmp_path / "out", 1))
    with pytest.raises(BadRowError, match=bad_id) as err:
        run_sft(cfg)  # stops before any learner starts
    assert "on_bad_row=skip" in str(err.value)

    processor = load_processor(tiny_model("qwen2"))
    skipped = build_sequences(rows, processor, DataConfig(path=str(data), on_bad_row="skip"), SFTOptions(), False)
    assert sorted(skipped) == sorted(r["id"] for r in rows if r["id"] != bad_id)


def test_rows_are_rendered_per_type_with_both_templates(tiny_model, text_mix):
    processor = load_processor(tiny_model("qwen2"))
    rows = read_rows(text_mix)[:8]
    by_type = build_sequences(rows, processor, DataConfig(path=str(text_mix)), SFTOptions(router_loss_weight=1.0), True)
    for row in rows:
        (seq,) = by_type[row["id"]]
        expected = "think" if row["data_source"] == "math" else "fast"
        assert seq.route == expected and seq.router_label == ["fast", "think"].index(expected)
        response = processor.decode(seq.response_ids)
        assert response.startswith("<think>" + (row["solution"]["think"] if expected == "think" else "") + "</think>")
        assert response.endswith(f"<answer>{row['solution']['answer']}</answer>{processor.eos_token}")
        # The router reads every prompt in one template, so the template cannot give the label away.
        assert processor.decode(seq.router_prompt_ids).count("Answer at once") == 1
    both = build_sequences(rows, processor, DataConfig(path=str(text_mix)), SFTOptions(route="both"), False)
    assert all(len(seqs) == 2 and seqs[0].route is None for seqs in both.values())
    think, fast = both[rows[0]["id"]]
    assert processor.decode(think.prompt_ids) != processor.decode(fast.prompt_ids)  # each template's system prompt


def test_killed_run_resumes_from_its_checkpoint_and_the_loss_curve_continues(ray_local, tiny_model, text_mix, tmp_path):
    from transformers import AutoModelForCausalLM

    model, out = tiny_model("qwen2"), tmp_path / "run"
    args = sft_args(model, text_mix, out, 40, "trainer.save_every=2", "sft.route=both")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "recipes/sft.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(read_metrics(out)) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    finally:
        proc.kill()
        proc.wait()
    killed = {m["step"]: m["loss"] for m in read_metrics(out)}
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_????????"))
    assert saved and saved[-1] < max(killed)  # steps were logged after the newest checkpoint

    run_sft(load_config(SFTConfig, args))  # resume=auto is the default
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 41))  # one line per step, no fork, no gap
    for m in resumed:
        if m["step"] in killed:
            assert m["loss"] == pytest.approx(killed[m["step"]], abs=1e-6), m["step"]
    assert (out / "config.yaml").is_file()
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_the_recipe_fits_its_default_lengths_to_a_512_position_model(ray_local, text_mix, tmp_path):
    """No length key given: data.max_prompt_tokens + sft.max_response_tokens (1024 + 512 by default) are lowered to
    fit the model's 512 positions (home_rl/context_length.py) and config.yaml records what ran."""
    from home_rl.tiny import build_tiny_model

    model = build_tiny_model("qwen2", tmp_path / "model_512", context=512)
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "recipes/sft.py", *sft_args(model, text_mix, out, 1)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = load_config(SFTConfig, ["--config", str(out / "config.yaml")])
    assert (ran.data.max_prompt_tokens, ran.sft.max_response_tokens) == (341, 170)
    assert [m["step"] for m in read_metrics(out)] == [1] and (out / "final" / "config.json").is_file()


def test_stage_sft_of_a_home_model_trains_tokens_and_router(ray_local, tiny_home, text_mix, tmp_path):
    from home_rl.model import HomeModel, is_home_checkpoint

    home_dir = tiny_home("qwen2")
    out = tmp_path / "stage_sft"
    final = run_sft(load_config(SFTConfig, sft_args(home_dir, text_mix, out, 6, "sft.router_loss_weight=1.0",
                                                    "learner.lr=1e-2")))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["loss"] == pytest.approx(m["token_loss"] + m["router_loss"], abs=1e-5) for m in metrics)
    assert metrics[0]["router_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert min(m["router_loss"] for m in metrics[3:]) < metrics[0]["router_loss"]
    assert is_home_checkpoint(final)
    HomeModel.from_pretrained(final)


def test_cold_start_rows_follow_the_plan_and_the_recipe_reads_back_equal():
    """A recipe that compared unequal to its own stamp file would rebuild the cold start on every run."""
    from home_rl.trainer.cold_start import TRAIN_PLAN, cold_start_recipe, heldout_rows, train_rows
    from home_rl.trainer.sft import experts_for

    recipe = cold_start_recipe("smollm2")
    assert json.loads(json.dumps(recipe)) == recipe
    rows = train_rows()
    counts = {}
    for row in rows:
        key = (experts_for(row, SFTOptions(route="row"))[0], row["data_source"])
        counts[key] = counts.get(key, 0) + 1
    assert counts == {(expert, family): n for expert, family, _, n in TRAIN_PLAN}
    assert {r["extra_info"]["steps"] for r in rows if r["extra_info"]["expert"] == "think" and r["data_source"] == "math"} == set(range(1, 7))
    assert len({r["id"] for r in rows}) == len(rows)
    held_out = heldout_rows(50)
    assert len(held_out) == 50 and not {r["prompt"] for r in held_out} & {r["prompt"] for r in rows}


def test_a_cold_start_stamp_from_before_a_new_knob_still_matches():
    """A knob added since the cache was stamped (here data.answer_key) must not rebuild the cold start; a
    changed setting must."""
    import copy

    from home_rl.trainer.cold_start import _same_recipe, cold_start_recipe

    recipe = cold_start_recipe("smollm2")
    older = copy.deepcopy(recipe)
    del older["sft"]["data"]["answer_key"]
    older["sft"]["learner"]["node_resource"] = ""  # stamped before the learner's resources had their own section
    assert _same_recipe(older, recipe)
    older["sft"]["learner"]["lr"] *= 2
    assert not _same_recipe(older, recipe) and not _same_recipe(None, recipe)


@pytest.mark.slow
def test_cold_start_teaches_both_output_templates():
    """The embedded default's cold start (built once, then cached): >= 90% well-formed answers per template."""
    from home_rl.trainer.cold_start import cold_start_dir, ensure_cold_start, evaluate_templates, heldout_rows
    from home_rl.model import is_home_checkpoint

    home = ensure_cold_start("smollm2")
    assert home == cold_start_dir("smollm2") and is_home_checkpoint(home)
    rows = heldout_rows(200)
    assert len(rows) == 200
    report = evaluate_templates(home, rows, temperature=1.0)
    print(json.dumps(report))
    for expert in ("think", "fast"):
        assert report[expert]["well_formed"] >= 0.9, report[expert]
