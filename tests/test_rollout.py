"""Rollout workers on real vLLM (CPU build) in real Ray actors, checked against transformers.

One pool of two fp32 workers over a tiny Qwen2 (tied embeddings) and one worker over a tiny
Qwen2.5-VL serve every test of this module. Run with -s to see the log-prob agreement figures.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from home_rl.errors import ConfigError, ModelError
from home_rl.resources import Resources
from home_rl.rollout import (RolloutConfig, RolloutInputError, RolloutPool, check_rollout_config, logprob_agreement,
                             recompute_logprobs, split_batch)
from home_rl.weights import StagedWeights, WeightSender
from home_rl.weights.gloo import missing_fused_parts

MAX_NEW = 16


def tiny_cfg(**overrides) -> RolloutConfig:
    base = dict(num_workers=2, n=4, dtype="float32", max_model_len=128, max_response_tokens=MAX_NEW,
                kv_cache_gib=0.25, resources=Resources(cpus=1, threads=1), seed=0)
    return RolloutConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def qwen2(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def tokenizer(qwen2):
    return transformers.AutoTokenizer.from_pretrained(qwen2)


@pytest.fixture(scope="module")
def base_model(qwen2):
    return transformers.AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pool(ray_local, qwen2):
    """Two engines that load new weights from a WeightSender in this process (in a run: learner rank 0)."""
    pool = RolloutPool(str(qwen2), tiny_cfg())
    pool.attach(WeightSender())
    yield pool
    pool.sender.shutdown()
    pool.shutdown()


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """16 distinct prompts of different lengths, each naming its row."""
    return [{"prompt_token_ids": chat_ids(tokenizer, f"what is {i} + {3 * i}?" + " then add one" * (i % 4)),
             "row_id": f"q{i}"} for i in range(16)]


def push(pool: RolloutPool, named_tensors, version: int) -> dict:
    """Stage `named_tensors` as `version` on the pool's sender, and have every engine load it."""
    pool.sender.stage(version, named_tensors)
    return pool.sync(version)


def load_state(pool: RolloutPool, model: torch.nn.Module, version: int) -> dict:
    """Send every tensor of `model` (a full update)."""
    return push(pool, model.state_dict().items(), version)


def hf_greedy(model, ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def perturbed(model, select, seed: int, scale: float = 0.1):
    """A copy of `model` whose parameters chosen by `select(name)` moved by random noise."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if select(name):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return new


def assert_greedy_matches(pool, model, prompts, version):
    result = pool.generate(prompts, n=1, sampling={"temperature": 0.0, "stop": []})
    for prompt, group in zip(prompts, result.samples):
        (sample,) = group
        assert sample.weights_version == version
        expected = hf_greedy(model, prompt["prompt_token_ids"])
        # vLLM stops at EOS (and includes it); transformers pads after it
        assert sample.response_ids == expected[:len(sample.response_ids)], prompt["row_id"]
    return result


# ----------------------------------------------------------------------------- pure helpers


def test_split_batch_balances_count_and_length():
    costs = [100, 5, 7, 90, 3, 60, 8, 40, 1, 2, 30, 9, 4, 6, 80, 10]
    parts = split_batch(costs, 2)
    assert sorted(i for p in parts for i in p) == list(range(16))
    assert [len(p) for p in parts] == [8, 8]
    assert all(p == sorted(p) for p in parts)
    loads = [sum(costs[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(costs) / 2
    assert split_batch([1.0, 1.0, 1.0], 4) == [[0], [1], [2], []]


def test_staged_buckets_follow_decoder_layers():
    """One bucket per decoder layer (and one each for what comes before and after them): a fused layer's parts
    (q/k/v, gate/up) always travel together, whatever order the learner gathered them in."""
    leaf = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{x}.weight" for i in (1, 0) for x in leaf[::-1]]
    names += ["model.norm.weight", "model.layers.0.input_layernorm.weight"]
    staged = StagedWeights()
    staged.stage(3, [(n, torch.zeros(2)) for n in names])
    staged.select(3)
    groups = staged.groups()
    assert groups[0] == ["model.embed_tokens.weight"] and groups[-1] == ["model.norm.weight"]
    assert [{n.split(".")[2] for n in g} for g in groups[1:-1]] == [{"0"}, {"1"}]  # whole layers, in layer order
    assert sorted(n for g in groups for n in g) == sorted(names)
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert all(missing_fused_parts(g, mapping) == [] for g in groups)
    assert [m.name for m in staged.metadata()] == [n for g in groups for n in g]
    staged.stage_unchanged(4, of=3)
    staged.drop_before(4)
    assert list(staged.versions) == [4] and staged.versions[4][1][0][0] == groups[1][0]


def test_missing_fused_parts_names_the_siblings():
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert missing_fused_parts(names, mapping) == ["model.layers.0.self_attn.k_proj.weight",
                                                   "model.layers.0.self_attn.v_proj.weight"]
    assert missing_fused_parts(names[1:], mapping) == []


def test_vllm_is_imported_only_through_its_list_of_names():
    """Beyond `vllm`'s top level, the package reaches vLLM only through home_rl/vllm_names.py, and every
    name listed there exists in the installed vLLM."""
    import re
    from pathlib import Path

    import vllm

    from home_rl import vllm_names as vn

    package = Path(vn.__file__).parent
    direct = [f"{path.relative_to(package)}:{n + 1}" for path in package.rglob("*.py") if path.name != "vllm_names.py"
              for n, line in enumerate(path.read_text().splitlines())
              if re.match(r"\s*(from vllm\.|import vllm\.)", line)]
    assert direct == []
    assert vllm.__version__ == vn.CHECKED_AGAINST
    for name in [*vn.WEIGHT_TRANSFER, *vn.INTERNAL]:
        assert getattr(vn, name) is not None, name


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rollout.max_model_len"):
        check_rollout_config(RolloutConfig(max_model_len=64, max_response_tokens=64))
    with pytest.raises(ConfigError, match="rollout.on_long_prompt"):
        check_rollout_config(RolloutConfig(on_long_prompt="drop"))
    with pytest.raises(ConfigError, match="in_process_engine"):
        check_rollout_config(RolloutConfig(tensor_parallel_size=2))


# ----------------------------------------------------------------------------- generation


def test_two_workers_split_16_prompts_in_input_order(pool, prompts):
    result = pool.generate(prompts, seed=1)
    assert len(result.samples) == 16
    for i, (prompt, group) in enumerate(zip(prompts, result.samples)):
        assert [s.sample_index for s in group] == [0, 1, 2, 3]
        for s in group:
            assert (s.prompt_index, s.row_id) == (i, prompt["row_id"])
            assert s.prompt_ids == prompt["prompt_token_ids"]
            assert 1 <= len(s.response_ids) <= MAX_NEW and len(s.logprobs) == len(s.response_ids)
            assert all(lp <= 0 for lp in s.logprobs)
            assert s.finish_reason in ("stop", "length")
    per_worker = result.stats["per_worker"]
    assert sorted(w["worker"] for w in per_worker) == [0, 1]
    assert [w["prompts"] for w in per_worker] == [8, 8]
    assert {s.worker for s in result.flat()} == {0, 1}
    assert all(w["tokens_per_s"] > 0 for w in per_worker)
    assert result.stats["generated_tokens"] == sum(len(s.response_ids) for s in result.flat())


def test_seeded_generation_repeats(pool, prompts):
    first = [s.response_ids for s in pool.generate(prompts[:4], seed=7).flat()]
    again = [s.response_ids for s in pool.generate(prompts[:4], seed=7).flat()]
    other = [s.response_ids for s in pool.generate(prompts[:4], seed=8).flat()]
    assert first == again
    assert first != other


def test_logprob_agreement_fp32(pool, prompts, base_model):
    load_state(pool, base_model, version=10)
    samples = pool.generate(prompts, seed=2).flat()
    stats = logprob_agreement(samples, recompute_logprobs(base_model, samples))
    print(f"\nlog-prob agreement, tiny qwen2 fp32, vLLM (sampled, T=1) vs transformers forward: {stats}")
    assert stats["tokens"] > 100
    assert stats["rollout/logprob_diff_max"] <= 1e-3
    assert stats["rollout/logprob_diff_mean"] <= 1e-4


# ----------------------------------------------------------------------------- weight updates


def test_think_only_update_matches_transformers_and_leaves_the_rest(pool, prompts, base_model):
    load_state(pool, base_model, version=20)
    before = pool.generate(prompts[:8], n=1, sampling={"temperature": 0.0, "stop": []})
    kept = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"]
    kept_before = pool.engine_tensors(kept)

    is_mlp = lambda name: ".mlp." in name  # noqa: E731  the dense view's names of the think expert
    updated = perturbed(base_model, is_mlp, seed=1)
    # the learner side also has changed attention weights that are NOT sent: they must not appear
    not_sent = perturbed(updated, lambda n: "self_attn" in n, seed=2)
    changed = [(n, t) for n, t in not_sent.state_dict().items() if is_mlp(n)]
    report = push(pool, changed, version=21)
    layers = base_model.config.num_hidden_layers
    assert report["buckets"] == layers and report["tensors"] == len(changed) == 3 * layers  # a bucket per layer

    after = assert_greedy_matches(pool, updated, prompts[:8], version=21)
    assert [s.response_ids for s in after.flat()] != [s.response_ids for s in before.flat()]
    for name, tensor in pool.engine_tensors(kept, rank=1).items():
        assert torch.equal(tensor, kept_before[name]), name
    sampled = pool.generate(prompts[:8], seed=3).flat()
    stats = logprob_agreement(sampled, recompute_logprobs(updated, sampled))
    assert stats["rollout/logprob_diff_max"] <= 1e-3, stats


def test_full_update_repacks_tied_lm_head(pool, prompts, qwen2):
    new = transformers.AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32).eval()
    new = perturbed(new, lambda n: True, seed=5, scale=0.05)  # embeddings (tied LM head) change too
    assert new.config.tie_word_embeddings
    load_state(pool, new, version=30)
    assert_greedy_matches(pool, new, prompts[:8], version=30)  # a stale packed LM head would answer otherwise


def test_update_missing_a_fused_part_is_refused(pool, prompts, base_model):
    load_state(pool, base_model, version=40)
    broken = perturbed(base_model, lambda n: "layers.0.self_attn.q_proj" in n, seed=9)
    only_q = [(n, t) for n, t in broken.state_dict().items() if "layers.0.self_attn.q_proj" in n]
    with pytest.raises(ModelError, match=r"stay at version 40.*k_proj\.weight"):
        push(pool, only_q, version=41)
    assert_greedy_matches(pool, base_model, prompts[:4], version=40)  # the layer was put back as it was


def test_update_with_unknown_tensor_fails_cleanly(pool, prompts, base_model):
    load_state(pool, base_model, version=50)
    with pytest.raises(ModelError, match="no_such_layer"):
        push(pool, [("model.no_such_layer.weight", torch.zeros(4))], version=51)
    assert_greedy_matches(pool, base_model, prompts[:4], version=50)


# ----------------------------------------------------------------------------- bad input


def test_long_prompt_error_truncate_skip(pool, prompts, tokenizer):
    long_ids = chat_ids(tokenizer, "the answer is " * 60)
    max_prompt = tiny_cfg().max_prompt_tokens
    assert len(long_ids) > max_prompt
    batch = prompts[:3] + [{"prompt_token_ids": long_ids, "row_id": "too-long"}]
    with pytest.raises(RolloutInputError, match=r"prompt 3 \(row too-long\): \d+ prompt tokens"):
        pool.generate(batch, n=1)

    truncated = pool.generate(batch, n=2, on_long_prompt="truncate")
    assert truncated.stats["long_prompts"] == 1 and truncated.stats["truncated_prompts"] == 1
    assert all(s.prompt_truncated and s.prompt_ids == long_ids[-max_prompt:] for s in truncated.samples[3])
    assert len(truncated.samples[3]) == 2

    skipped = pool.generate(batch, n=2, on_long_prompt="skip")
    assert skipped.samples[3] == [] and [len(g) for g in skipped.samples[:3]] == [2, 2, 2]
    assert skipped.stats["skipped_prompts"] == 1 and skipped.stats["long_prompts"] == 1


def test_malformed_prompt_names_the_row(pool):
    with pytest.raises(RolloutInputError, match=r"prompt 1 \(row bad\)"):
        pool.generate([{"prompt": "hello"}, {"text": "hello", "row_id": "bad"}], n=1)


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def vl(tiny_model):
    return tiny_model("qwen2_5_vl")


@pytest.fixture(scope="module")
def vl_pool(ray_local, vl):
    pool = RolloutPool(str(vl), tiny_cfg(num_workers=1, max_model_len=256))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def vl_model(vl):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(vl, dtype=torch.float32).eval()


def vl_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def assert_vl_greedy_matches(vl_pool, processor, model, version: int) -> None:
    from PIL import Image

    images = [Image.new("RGB", (100, 60), c) for c in ("red", "blue")]
    texts = [vl_prompt(processor, "what colour is it?"), vl_prompt(processor, "what shape is it?")]
    batch = [{"prompt": t, "multi_modal_data": {"image": [im]}, "row_id": f"img{k}"}
             for k, (t, im) in enumerate(zip(texts, images))]
    result = vl_pool.generate(batch, n=1, sampling={"temperature": 0.0, "stop": []})
    pad = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for text, image, (sample,) in zip(texts, images, result.samples):
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        assert sample.prompt_ids == inputs["input_ids"][0].tolist()  # placeholders expanded as transformers does
        assert sample.prompt_ids.count(pad) > 1 and sample.weights_version == version
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert sample.response_ids == expected.tolist()[:len(sample.response_ids)]


def test_qwen2_5_vl_generates_with_images(vl_pool, vl, vl_model):
    assert_vl_greedy_matches(vl_pool, transformers.AutoProcessor.from_pretrained(vl), vl_model, version=0)


def test_qwen2_5_vl_update_under_view_names(vl_pool, vl, vl_model):
    """MLPs under transformers' names (model.language_model.*, model.visual.*) reach vLLM; the images'
    cached encoder outputs (same images as the test before) are recomputed with the new vision weights."""
    updated = perturbed(vl_model, lambda n: ".mlp." in n, seed=3)
    changed = [(n, t) for n, t in updated.state_dict().items() if ".mlp." in n]
    assert any(n.startswith("model.language_model.layers.") for n, _ in changed)
    assert any(n.startswith("model.visual.blocks.") for n, _ in changed)
    vl_pool.attach(WeightSender())
    push(vl_pool, changed, version=1)
    assert_vl_greedy_matches(vl_pool, transformers.AutoProcessor.from_pretrained(vl), updated, version=1)


def test_missing_image_names_the_row(vl_pool, vl):
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(vl)
    text = vl_prompt(processor, "what colour is it?")
    ok = {"prompt": text, "multi_modal_data": {"image": [Image.new("RGB", (64, 64), "red")]}, "row_id": "fine"}
    with pytest.raises(RolloutInputError, match=r"prompt 1 \(row no-image\).*no image was given"):
        vl_pool.generate([ok, {"prompt": text, "row_id": "no-image"}], n=1)
    with pytest.raises(RolloutInputError, match=r"prompt 0 \(row none-image\): image 0 is missing"):
        vl_pool.generate([{"prompt": text, "multi_modal_data": {"image": [None]}, "row_id": "none-image"}], n=1)


def test_qwen2_5_vl_never_samples_an_image_placeholder(vl_pool, vl):
    """A sampled <|image_pad|> would be an image without pixels in the learner's forward pass. The tiny random model
    samples one now and then (a 2048-token GRPO step of it did, before placeholders were barred): here 4096 tokens
    at vLLM's highest temperature."""
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(vl)
    placeholders = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    batch = [{"prompt": vl_prompt(processor, f"what colour is it? {k}"), "row_id": f"img{k}",
              "multi_modal_data": {"image": [Image.new("RGB", (64, 64), "red")]}} for k in range(4)]
    result = vl_pool.generate(batch, n=64, sampling={"temperature": 2.0, "stop": []})
    sampled = [t for group in result.samples for s in group for t in s.response_ids]
    assert len(sampled) > 3000 and not placeholders & set(sampled)
