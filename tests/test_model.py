"""The HOME model: upcycling is exact, routing is per row, views and checkpoints round-trip."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from home_rl.errors import ModelError
from home_rl.model import FAST, THINK, HomeModel, is_home_checkpoint, load_dense, upcycle, view_name

ARCHS = ["qwen2", "llama", "qwen2_5_vl"]
REPO = Path(__file__).resolve().parents[1]


def batch_for(arch: str, folder: Path, rows: int = 2) -> dict:
    """A batch of `rows` prompts (with one image each for the VL model), all the same length."""
    if arch != "qwen2_5_vl":
        g = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(0, 600, (rows, 11), generator=g),
                "attention_mask": torch.ones(rows, 11, dtype=torch.long)}
    processor = transformers.AutoProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    images = [Image.new("RGB", (64, 64), (255 * (i % 2), 40 * i, 200)) for i in range(rows)]
    # mm_token_type_ids matter: without them transformers 5.10 silently uses 1-D positions for image tokens
    return dict(processor(text=[text] * rows, images=images, return_tensors="pt"))


def row(inputs: dict, i: int) -> dict:
    """Row i of a batch; pixel_values of the VL model are stacked per image, not per row."""
    out = {k: v[i:i + 1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in inputs:
        patches = [int(t.prod()) for t in inputs["image_grid_thw"]]
        start = sum(patches[:i])
        out["pixel_values"] = inputs["pixel_values"][start:start + patches[i]]
        out["image_grid_thw"] = inputs["image_grid_thw"][i:i + 1]
    return out


@pytest.fixture(scope="module")
def homes(tiny_model):
    """arch -> (dense model, HOME model whose think expert was perturbed so the experts differ)."""
    built = {}

    def get(arch):
        if arch not in built:
            home = upcycle(tiny_model(arch))
            built[arch] = (load_dense(tiny_model(arch)), home)
        return built[arch]

    return get


def perturbed(home: HomeModel) -> HomeModel:
    with torch.no_grad():
        for name, p in home.named_parameters():
            if ".experts.think." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return home


@pytest.mark.parametrize("arch", ARCHS)
def test_upcycled_model_matches_dense_on_either_expert(arch, homes, tiny_model):
    dense, home = homes(arch)
    inputs = batch_for(arch, tiny_model(arch), rows=3 if arch != "qwen2_5_vl" else 2)
    with torch.no_grad():
        expected = dense(**inputs).logits
        for expert in (THINK, FAST):
            assert (home(route=expert, **inputs).logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_routing_equals_each_row_alone_through_its_view(arch, tiny_model, tmp_path):
    home = perturbed(upcycle(tiny_model(arch)))
    inputs = batch_for(arch, tiny_model(arch), rows=2)
    routes = [FAST, THINK]
    with torch.no_grad():
        mixed = home(route=routes, **inputs).logits
        views = {e: load_dense(home.export_view(e, tmp_path / e)) for e in (FAST, THINK)}
        for i, expert in enumerate(routes):
            alone = views[expert](**row(inputs, i)).logits[0]
            assert (mixed[i] - alone).abs().max().item() <= 1e-5
        # the experts really differ, so the comparison above could fail
        assert (views[FAST](**row(inputs, 1)).logits[0] - mixed[1]).abs().max().item() > 1e-3


def test_each_expert_computes_only_its_rows(homes):
    _, home = homes("qwen2")
    calls = {FAST: [], THINK: []}
    hooks = [mlp.experts[e].register_forward_hook(lambda m, a, o, e=e: calls[e].append(a[0].shape[0]))
             for mlp in home.hybrid_mlps for e in (FAST, THINK)]
    try:
        with torch.no_grad():
            home(route=[THINK, FAST, THINK], input_ids=torch.ones(3, 5, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    assert calls[THINK] == [2, 2] and calls[FAST] == [1, 1]  # rows per call, one call per layer


def test_view_names_map_home_parameters_to_dense_names():
    name = "base.model.layers.3.mlp.experts.think.up_proj.weight"
    assert view_name(name, THINK) == "model.layers.3.mlp.up_proj.weight"
    assert view_name(name, FAST) is None
    assert view_name("base.model.norm.weight", FAST) == "model.norm.weight"
    assert view_name("router.net.1.weight", THINK) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_is_exact(arch, homes, tmp_path):
    _, home = homes(arch)
    out = home.save_pretrained(tmp_path / "home")
    assert is_home_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["home"]["experts"] == [FAST, THINK] and config["home"]["base_architecture"] == home.arch.name
    loaded = HomeModel.from_pretrained(out)
    a, b = home.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    if arch == "qwen2_5_vl":
        assert (out / "processor_config.json").is_file()


def test_checkpoint_missing_expert_or_router_tensors_names_them(homes, tmp_path):
    _, home = homes("llama")
    out = home.save_pretrained(tmp_path / "home")
    state = load_file(out / "model.safetensors")
    dropped = ["router.net.1.weight", "base.model.layers.1.mlp.experts.think.down_proj.weight"]
    save_file({k: v for k, v in state.items() if k not in dropped}, out / "model.safetensors")
    with pytest.raises(ModelError) as e:
        HomeModel.from_pretrained(out)
    assert all(k in str(e.value) for k in dropped)


def test_bad_model_folders_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        upcycle(tmp_path / "nope")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="unsupported model architecture 'GPT2LMHeadModel'.*supported: "
                                         "Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM, LlamaForCausalLM"):
        upcycle(gpt2)
    with pytest.raises(ModelError, match="dense checkpoint, not a HOME one"):
        HomeModel.from_pretrained(tiny_model("qwen2"))


def test_router_reads_the_configured_layer_and_stops_there(tiny_model):
    home = upcycle(tiny_model("llama"), router_layer=0, router_pooling="last")
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(home.base.model.layers)]
    inputs = {"input_ids": torch.ones(2, 6, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])}
    with torch.no_grad():
        logits = home.route_logits(**inputs)
        features = home.router_features(**inputs)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 2) and features.shape == (2, 64)
    assert set(ran) == {0}  # layer 1 never ran
    with torch.no_grad():
        hidden = home(route=FAST, output_hidden_states=True, **inputs).hidden_states[1]
    assert torch.allclose(features, hidden[:, -1])  # 'last' = last attended position


def test_parameter_report_adds_up(homes):
    _, home = homes("qwen2")
    r = home.parameter_report()
    assert r["total"] == r["shared"] + r[FAST] + r[THINK] + r["router"]
    assert r[FAST] == r[THINK] > 0 and r["active_per_query"] == r["shared"] + r[THINK]


def _greedy_hf(model, inputs: dict, steps: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache: positions, images and all come out exact)."""
    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            if "mm_token_type_ids" in inputs:  # generated tokens are text (type 0)
                extra["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(out)))
            nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_views_generate_in_vllm_like_transformers(arch, tiny_model, tmp_path):
    import gc

    import vllm

    home = perturbed(upcycle(tiny_model(arch)))
    view = home.export_view(THINK, tmp_path / "view")
    dense = load_dense(view)
    inputs = row(batch_for(arch, tiny_model(arch), rows=1), 0)
    request = {"prompt_token_ids": inputs["input_ids"][0].tolist()}
    if arch == "qwen2_5_vl":
        processor = transformers.AutoProcessor.from_pretrained(view)
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "what colour is it?"}]}], add_generation_prompt=True, tokenize=False)
        request = {"prompt": text, "multi_modal_data": {"image": Image.new("RGB", (64, 64), (0, 0, 200))}}
    llm = vllm.LLM(model=str(view), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   **({"limit_mm_per_prompt": {"image": 1}} if arch == "qwen2_5_vl" else {}))
    try:
        out = llm.generate([request], vllm.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    finally:
        del llm
        gc.collect()
    assert list(out.prompt_token_ids) == inputs["input_ids"][0].tolist()  # vLLM saw the learner's tokens
    assert list(out.outputs[0].token_ids) == _greedy_hf(dense, inputs, 16)


def test_upcycle_recipe_errors_are_one_line(tmp_path):
    for arg, needle in [("model.path=/does/not/exist", "no such model folder"),
                        ("model.pth=x", "did you mean 'model.path'")]:
        proc = subprocess.run([sys.executable, str(REPO / "recipes/upcycle.py"), arg], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_upcycle_recipe_on_a_tiny_model_writes_a_loadable_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "home"
    proc = subprocess.run([sys.executable, str(REPO / "recipes/upcycle.py"), f"model.path={tiny_model('qwen2')}",
                           f"output_dir={out}", "model.dtype=float32", "router.layer=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "think" in proc.stdout and "active_per_query" in proc.stdout
    home = HomeModel.from_pretrained(out)
    assert home.home_config["router_layer"] == 1 and (out / "config.yaml").is_file()


def test_upcycle_recipe_keeps_the_dense_dtype_unless_told(tiny_model, tmp_path):
    fp32 = tiny_model("qwen2")  # an fp32 folder
    bf16 = tmp_path / "dense_bf16"
    load_dense(fp32, torch.bfloat16).save_pretrained(bf16)
    transformers.AutoTokenizer.from_pretrained(fp32).save_pretrained(bf16)

    def run(dense: Path, *args: str) -> tuple[str, set]:
        out = tmp_path / f"home_{len(list(tmp_path.iterdir()))}"
        proc = subprocess.run([sys.executable, str(REPO / "recipes/upcycle.py"), f"model.path={dense}",
                               f"output_dir={out}", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout, {t.dtype for t in load_file(out / "model.safetensors").values()}

    stdout, dtypes = run(fp32)  # model.dtype=auto, the recipe's default
    assert dtypes == {torch.float32} and "dtype: float32 (model.dtype=auto: the dense checkpoint's own)" in stdout
    stdout, dtypes = run(bf16)
    assert dtypes == {torch.bfloat16} and "dtype: bfloat16 (model.dtype=auto" in stdout
    stdout, dtypes = run(fp32, "model.dtype=bfloat16")
    assert dtypes == {torch.bfloat16}
    assert "dtype: bfloat16 (model.dtype=bfloat16: the dense checkpoint's is float32)" in stdout


def test_a_bfloat16_checkpoint_loads_every_expert_in_bfloat16(tiny_model, tmp_path):
    # the experts added to the base were built in torch's default dtype: a bfloat16 run saved its think expert in float32
    folder = upcycle(tiny_model("qwen2"), torch.bfloat16).save_pretrained(tmp_path / "home")
    loaded = HomeModel.from_pretrained(folder, copies={"think_ref": THINK})
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(loaded.save_pretrained(tmp_path / "again") / "model.safetensors").values()} == {
        torch.bfloat16}


@pytest.mark.slow
def test_upcycle_recipe_default_is_the_embedded_smollm2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "recipes/upcycle.py")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LlamaForCausalLM" in proc.stdout
    report = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in proc.stdout.splitlines()
              if line.split() and line.split()[0] in ("total", "shared", "fast", "think", "router")}
    assert report["shared"] + report["fast"] == 134_515_008  # SmolLM2-135M: shared + one expert = the dense model
    assert is_home_checkpoint(tmp_path / "outputs/upcycle")
