"""A LoRA think expert (home_rl/model/lora_expert.py): the model, its PEFT adapter folder, vLLM engines that answer
with it, and GRPO that trains it alone."""
from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from home_rl.config import LoraConfig, ModelConfig, load_config
from home_rl.errors import ConfigError, ModelError
from home_rl.memory_plan.shapes import model_shape
from home_rl.model import FAST, THINK, HomeModel, upcycle, view_name
from home_rl.model.lora_expert import ADAPTER_DIR, ADAPTER_WEIGHTS, LoraSpec
from home_rl.rollout.config import RolloutConfig
from home_rl.trainer.grpo_think import GRPOThinkConfig, GRPOThinkTrainer, train
from test_grpo_think import read_metrics, read_rollouts, rollout_ids, tiny_config

REPO = Path(__file__).resolve().parents[1]
SPEC = LoraSpec(rank=8, alpha=16.0)
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 41, 17, 3]])


def logits(model, route=None) -> torch.Tensor:
    with torch.no_grad():
        return (model(input_ids=IDS) if route is None else model(route=route, input_ids=IDS)).logits


@pytest.fixture(scope="module")
def trained_lora(tiny_model, tmp_path_factory) -> tuple[HomeModel, Path]:
    """A tiny Llama HOME with a LoRA think expert whose adapter was moved off zero, saved."""
    torch.manual_seed(0)
    home = upcycle(tiny_model("llama"), think_lora=SPEC)
    start_equal = torch.equal(logits(home, FAST), logits(home, THINK))
    for name, p in home.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    folder = home.save_pretrained(tmp_path_factory.mktemp("lora") / "home")
    assert start_equal  # the adapter starts at zero: think = fast at upcycling
    return home, folder


def test_the_think_adapter_is_the_only_think_tensor_and_is_stored_as_peft_writes_it(trained_lora):
    home, folder = trained_lora
    counts = home.parameter_report()
    mlp = 3 * 64 * 128  # gate, up and down projections of one tiny layer
    assert counts[THINK] == 2 * 8 * (64 + 128) * 3 and counts[FAST] == 2 * mlp
    assert counts["active_per_query"] == counts["shared"] + counts[FAST] + counts[THINK]
    shape = model_shape(folder, THINK, [f"think_ref={THINK}"])  # the memory plan: the adapter trains
    assert (shape.trainable, shape.frozen_copies, shape.adapted) == (counts[THINK], counts[THINK], counts[FAST])
    with safe_open(folder / "model.safetensors", "pt") as st:
        assert not [k for k in st.keys() if "lora" in k or ".experts.think." in k]
    config = json.loads((folder / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16.0)
    assert set(config["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    assert json.loads((folder / "config.json").read_text())["home"]["think_lora"] == SPEC.as_dict()

    again = HomeModel.from_pretrained(folder)
    assert torch.equal(logits(again, THINK), logits(home, THINK))
    assert torch.equal(logits(again, FAST), logits(home, FAST))
    with_reference = HomeModel.from_pretrained(folder, copies={"think_ref": THINK})
    assert torch.equal(logits(with_reference, "think_ref"), logits(home, THINK))
    assert not any(p.requires_grad for n, p in with_reference.named_parameters() if ".think_ref." in n)


def test_peft_loads_the_adapter_onto_the_fast_view_and_the_merged_view_computes_think(trained_lora, tmp_path):
    home, folder = trained_lora
    think = logits(home, THINK)
    assert not torch.allclose(think, logits(home, FAST), atol=1e-3)
    fast_view = home.export_view(FAST, tmp_path / "fast")
    base = transformers.AutoModelForCausalLM.from_pretrained(fast_view, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(folder / ADAPTER_DIR))
    torch.testing.assert_close(logits(with_adapter), think, rtol=0, atol=1e-5)
    merged = transformers.AutoModelForCausalLM.from_pretrained(home.export_view(THINK, tmp_path / "think"),
                                                               dtype=torch.float32)
    torch.testing.assert_close(logits(merged), think, rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="no adapter"):
        home.export_adapter(tmp_path / "x", FAST)


def test_the_upcycle_recipe_makes_a_lora_think_expert_and_grpo_refuses_it_where_it_cannot_work(tiny_model, tiny_home,
                                                                                                 tmp_path):
    out = tmp_path / "home"
    proc = subprocess.run([sys.executable, str(REPO / "recipes/upcycle.py"), f"model.path={tiny_model('qwen2')}",
                           f"output_dir={out}", "model.think_expert=lora", "model.lora.rank=4", "model.lora.alpha=4",
                           "model.lora.targets=up_proj,down_proj"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    home = HomeModel.from_pretrained(out)
    assert home.home_config["think_lora"] == {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": ["up_proj", "down_proj"]}
    assert torch.equal(logits(home, THINK), logits(home, FAST))  # the adapter starts at zero
    with pytest.raises(ConfigError, match="think expert of model.path=.* is a full one"):
        GRPOThinkTrainer(tiny_config(tiny_home("qwen2"), tmp_path / "a", steps=1, model__think_expert="lora"))
    with pytest.raises(ConfigError, match="train_shared=true"):
        GRPOThinkTrainer(tiny_config(out, tmp_path / "b", steps=1, train_shared=True))
    assert load_config(GRPOThinkConfig, ["model.think_expert=lora"]).learner.lr == pytest.approx(3e-4)  # 10x
    assert load_config(GRPOThinkConfig, ["model.think_expert=lora", "learner.lr=3e-5"]).learner.lr == 3e-5
    with pytest.raises(ModelError, match="rank must be at least 1"):
        ModelConfig(think_expert="lora", lora=LoraConfig(rank=0)).lora_spec()


def greedy(home: HomeModel, route: str, prompt: list[int], tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(tokens):
            ids = torch.cat([ids, home(route=route, input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def test_engines_answer_with_the_adapter_and_load_each_version_sent_in_place(trained_lora, ray_local, tmp_path):
    """rollout.lora_engine=adapter (the GPU default): the engines hold the fast view and answer with the adapter; a
    version is the adapter's tensors, sent through the weight plane's adapter backend and loaded in place."""
    from home_rl.rollout import RolloutPool
    from home_rl.weights import WeightSender

    home, folder = copy.deepcopy(trained_lora[0]), trained_lora[1]  # its adapter changes below
    cfg = RolloutConfig(n=1, temperature=0.0, max_response_tokens=8, dtype="float32", kv_cache_gib=0.25,
                        max_model_len=256, stop=[])
    pool = RolloutPool(str(home.export_view(FAST, tmp_path / "fast")), cfg, adapter=str(folder / ADAPTER_DIR))
    prompts = [IDS[0].tolist(), [4, 8, 15, 16, 23, 42]]
    requests = [{"prompt_token_ids": p} for p in prompts]
    sender = WeightSender()
    try:
        pool.attach(sender)
        assert [s[0].response_ids for s in pool.generate(requests).samples] == [greedy(home, THINK, p, 8) for p in prompts]
        for name, p in home.named_parameters():  # a new version of the adapter
            if "lora_B" in name:
                p.data.mul_(-1.5)
        sender.stage(7, [(view_name(k, THINK), v.clone()) for k, v in home.state_dict().items() if ".experts.think." in k])
        report = pool.sync(7)
        assert report["bytes"] == sum(t.numel() * 4 for n, t in home.named_parameters() if ".lora_" in n)
        result = pool.generate(requests)
        assert [s[0].response_ids for s in result.samples] == [greedy(home, THINK, p, 8) for p in prompts]
        assert {s.weights_version for g in result.samples for s in g} == {7}
    finally:
        pool.shutdown()


def test_grpo_trains_only_the_adapter_under_zero3_and_resumes_exactly(tiny_home, ray_local, tmp_path):
    """Two ZeRO-3 learners train the adapter; the engines (rollout.lora_engine=auto: on CPU the merged think view)
    receive the projections with the adapter merged, sample what the learners compute, and a resumed run repeats
    the uninterrupted one."""
    home = tiny_home("qwen2", think_lora=SPEC)
    out = tmp_path / "run"

    def config(folder: Path, **overrides) -> GRPOThinkConfig:
        cfg = tiny_config(home, folder, steps=2, learner__lr=5e-3, eval__rows=0, **overrides)
        cfg.learner.num_learners, cfg.learner.zero_stage = 2, 3
        return cfg

    final = Path(train(config(out)))
    metrics = read_metrics(out)
    assert load_config(GRPOThinkConfig, ["--config", str(out / "config.yaml")]).rollout.lora_engine == "merged"
    before, after = load_file(home / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # base untouched
    start = load_file(home / ADAPTER_DIR / ADAPTER_WEIGHTS)
    trained = load_file(final / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert trained.keys() == start.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
    layers = json.loads((home / "config.json").read_text())["num_hidden_layers"]
    assert metrics[1]["weight_sync/tensors"] == 3 * layers  # gate, up and down projections, merged
    assert {s["weights_version"] for s in read_rollouts(out, 2)} == {1}
    for m in metrics:  # the engines sample what the learners compute
        assert m["rollout/logprob_diff_mean"] <= 1e-3 and m["rollout/logprob_pearson"] >= 0.999, m

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002", ignore_errors=True)
    train(config(resumed, trainer__resume="auto"))
    assert rollout_ids(resumed, 2) == rollout_ids(out, 2)
    again = load_file(resumed / "final" / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_stage_sft_of_a_lora_home_trains_the_adapter_and_the_router_alone(ray_local, tiny_home, tmp_path):
    from data_pipelines.synthetic import generate
    from home_rl.trainer.sft import SFTConfig, run_sft

    home = tiny_home("qwen2", think_lora=SPEC)
    data = generate("mix", 16, seed=0, out=tmp_path / "mix", ratio={"math": 0.5, "extract": 0.5})
    final = run_sft(load_config(SFTConfig, [
        f"model.path={home}", "model.dtype=float32", f"data.path={data}", f"output_dir={tmp_path / 'sft'}",
        "trainer.total_steps=2", "data.prompts_per_step=4", "learner.lr=1e-2", "learner.micro_batch_size=4",
        "learner.trainable=think,router", "sft.router_loss_weight=1.0", "trainer.tensorboard=false"]))
    before, after = load_file(home / "model.safetensors"), load_file(final / "model.safetensors")
    assert {k for k in before if not torch.equal(before[k], after[k])} == {k for k in before if k.startswith("router.")}
    start, trained = load_file(home / ADAPTER_DIR / ADAPTER_WEIGHTS), load_file(final / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert all(not torch.equal(start[k], trained[k]) for k in start if ".lora_B." in k)


# ----------------------------------------------------------------------------- router stage, evaluation, serving


@pytest.fixture(scope="module")
def lora_stage(tiny_home, tmp_path_factory) -> dict:
    """The router stage and the evaluation (greedy, one answer per expert) on a tiny Qwen2.5-VL whose think expert is
    a LoRA adapter moved off zero (think answers otherwise than fast)."""
    from router_runs import _cfgs

    from home_rl.trainer.evaluate import evaluate
    from home_rl.trainer.router_stage import train_router

    tmp = tmp_path_factory.mktemp("lora_stage")
    home = HomeModel.from_pretrained(tiny_home("qwen2_5_vl", router_hidden_size=16, think_lora=SPEC))
    torch.manual_seed(1)
    for name, p in home.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    stage, evaluation = _cfgs(home.save_pretrained(tmp / "home"), tmp)
    for cfg in (stage, evaluation):
        cfg.rollout.n, cfg.rollout.temperature = 1, 0.0
    evaluation.samples, evaluation.type_router.enabled = 0, False
    final = Path(train_router(stage))
    evaluate(evaluation)
    return {"final": final, "eval": tmp / "eval"}


def test_one_engine_serves_both_experts_as_the_evaluation_answered_and_routed(lora_stage, tmp_path):
    import psutil
    from openai import OpenAI
    from test_serve import ENGINE, chat_messages, eval_rows, free_port

    from home_rl.serve.protocol import split_response

    samples = {json.loads(line)["id"]: json.loads(line)
               for line in (lora_stage["eval"] / "samples.jsonl").read_text().splitlines()}
    assert any(s["responses_think"] != s["responses_fast"] for s in samples.values())
    port = free_port()
    cmd = [sys.executable, str(REPO / "recipes" / "serve.py"), f"checkpoint={lora_stage['final']}", f"port={port}",
           f"output_dir={tmp_path}", f"image_dir={lora_stage['eval'] / 'data'}", "engine.lora_engine=adapter", *ENGINE]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (tmp_path / "server.json").is_file():
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        engines = [c for c in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in c.name()]
        assert len(engines) == 1
        client = OpenAI(base_url=json.loads((tmp_path / "server.json").read_text())["url"], api_key="unused",
                        max_retries=0, timeout=120)
        for row in eval_rows(lora_stage):
            sample = samples[row["id"]]
            ask = dict(model="home", messages=chat_messages(row), max_tokens=8, temperature=0)
            for expert in ("think", "fast"):
                message = client.chat.completions.create(**ask, extra_body={"expert": expert}).choices[0].message
                answered = (message.model_extra.get("reasoning_content") or "", message.content or "")
                assert answered == split_response(sample[f"responses_{expert}"][0]), (row["id"], expert)
            routed = client.chat.completions.create(**ask).model_extra["home"]
            assert routed["expert"] == sample["choices"]["hybrid"], (row["id"], routed)
    finally:
        proc.send_signal(signal.SIGTERM)
        console = proc.communicate(timeout=120)[0]
    assert "one vLLM engine" in console, console
