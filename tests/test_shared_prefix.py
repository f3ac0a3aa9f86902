"""Shared-prefix rows: a prompt and its n responses in one row compute what n separate sequences compute.

Plain torch on tiny HOME models whose experts differ (each prompt on its own route); the learner group
runs the same code under DeepSpeed (tests/test_learner.py, shared_prefix on and off).
"""
from __future__ import annotations

import random

import pytest
import torch
import transformers
from PIL import Image

from home_rl.learner import LearnerConfig, Sequence
from home_rl.learner import forward
from home_rl.learner.batch import collate, collate_shared
from home_rl.learner.plan import micro_batches, plan_micro_batches, plan_rows, row_length, split_for_ranks
from home_rl.model import HomeModel, load_dense


def two_prompts_four_samples(arch: str, folder, seed: int = 0) -> list[Sequence]:
    """2 prompts x 4 sampled responses of 2-11 tokens; for the VL model each prompt holds an image of its own
    size, so the two prompts differ in image tokens and 3D rope positions."""
    rng = random.Random(seed)
    seqs = []
    if arch == "qwen2_5_vl":
        processor = transformers.AutoProcessor.from_pretrained(folder)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    for g in range(2):
        if arch == "qwen2_5_vl":
            out = processor(text=[text], images=[Image.new("RGB", (56 + 28 * g, 56), (255 * g, 40, 200))],
                            return_tensors="pt")
            prompt, types = out["input_ids"][0].tolist(), out["mm_token_type_ids"][0].tolist()
            images = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        else:
            prompt, types, images = [rng.randrange(600) for _ in range(7 + 5 * g)], None, {}
        for _ in range(4):
            response = [rng.randrange(600) for _ in range(rng.randrange(2, 12))]
            seqs.append(Sequence(prompt_ids=prompt, response_ids=response, route=["think", "fast"][g],
                                 mm_inputs=images, mm_token_type_ids=types,
                                 loss_mask=[float(rng.random() > 0.2) for _ in response],
                                 token_data={"advantages": [rng.uniform(-1, 1) for _ in response]}))
    return seqs


def loss_and_grads(model, mb, is_home: bool) -> tuple[list, list, dict]:
    """Per-sequence log-probs and entropies, and the gradients of a policy-gradient-like loss with an entropy term."""
    model.zero_grad()
    log_probs, entropy = forward.log_probs(model, model, mb, is_home, with_entropy=True)
    loss = (log_probs * mb.token_data["advantages"] * mb.loss_mask).sum() + 0.1 * (entropy * mb.loss_mask).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return mb.per_sequence(log_probs.detach()), mb.per_sequence(entropy.detach()), grads


def differing_experts(folder) -> HomeModel:
    model = HomeModel.from_pretrained(folder, dtype=torch.float32).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts.think." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


@pytest.mark.parametrize("arch,attention", [("qwen2", "sdpa"), ("qwen2", "eager"), ("qwen2_5_vl", "sdpa"),
                                            ("dense-qwen2", "sdpa")])
def test_shared_rows_give_the_log_probs_entropies_and_gradients_of_separate_sequences(arch, attention, tiny_model,
                                                                                      tiny_home):
    is_home = not arch.startswith("dense-")
    base_arch = arch.removeprefix("dense-")
    model = differing_experts(tiny_home(base_arch)) if is_home else load_dense(tiny_model(base_arch)).float().train()
    base = model.base if is_home else model
    base.config._attn_implementation = attention
    getattr(base.config, "text_config", base.config)._attn_implementation = attention
    seqs = two_prompts_four_samples(base_arch, tiny_model(base_arch))
    if not is_home:
        seqs = [Sequence(**{**s.__dict__, "route": None}) for s in seqs]
    rows = plan_rows(seqs, shared=True)
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shared = collate_shared([[seqs[i] for i in row] for row in rows], pad_id=0)
    assert shared.tokens == sum(row_length(seqs, r) for r in rows) < collate(seqs, 0).tokens == sum(len(s) for s in seqs)

    lp_alone, ent_alone, grads_alone = loss_and_grads(model, collate(seqs, pad_id=0), is_home)
    lp_shared, ent_shared, grads_shared = loss_and_grads(model, shared, is_home)
    assert max((a - b).abs().max().item() for a, b in zip(lp_alone, lp_shared)) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(ent_alone, ent_shared)) <= 1e-5
    assert grads_alone.keys() == grads_shared.keys() and len(grads_alone) > 10
    assert max((grads_alone[n] - grads_shared[n]).abs().max().item() for n in grads_alone) <= 1e-5
    assert max(g.abs().max().item() for g in grads_alone.values()) > 1e-2  # gradients that say something

    if base_arch == "qwen2_5_vl":  # the 3D rope matters: text positions alone would give other log-probs
        inputs = forward.model_inputs(model, shared, is_home)
        assert inputs["position_ids"].shape == (3, 2, shared.input_ids.shape[1])
        inputs.pop("position_ids")
        with torch.no_grad():
            naive = forward.gathered_log_probs(model(**inputs, position_ids=shared.position_ids).logits,
                                               shared.seq_rows, shared.seq_positions, shared.targets, False)[0]
        assert max((a - b).abs().max().item() for a, b in zip(lp_alone, shared.per_sequence(naive))) > 1e-3


def test_shared_logits_and_router_inputs_are_per_sequence(tiny_home):
    model = differing_experts(tiny_home("qwen2")).eval()
    seqs = two_prompts_four_samples("qwen2", None)
    seqs = [Sequence(**{**s.__dict__, "router_label": i % 2}) for i, s in enumerate(seqs)]
    plain, shared = collate(seqs, 0), collate_shared([seqs[:4], seqs[4:]], 0)
    with torch.no_grad():
        alone = forward.sequence_logits(model(**forward.model_inputs(model, plain, True)).logits, plain)
        packed = forward.sequence_logits(model(**forward.model_inputs(model, shared, True)).logits, shared)
        assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(alone, packed))
        per_row = model.route_logits(**shared.router_inputs())
        assert per_row.shape[0] == 2  # the router sees each prompt once ...
        torch.testing.assert_close(shared.per_sequence_rows(per_row), model.route_logits(**plain.router_inputs()))
    assert shared.router_labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]  # ... and is scored per sequence


def test_rows_micro_batches_and_ranks_keep_a_prompts_samples_together():
    rng = random.Random(3)
    prompts = [[rng.randrange(600) for _ in range(rng.randrange(3, 20))] for _ in range(5)]
    seqs = [Sequence(prompt_ids=prompts[i % 5], response_ids=[rng.randrange(600) for _ in range(rng.randrange(1, 9))])
            for i in range(20)]  # 5 prompts x 4 samples, interleaved
    rows = plan_rows(seqs, shared=True)
    assert sorted(map(sorted, rows)) == [[p, p + 5, p + 10, p + 15] for p in range(5)]
    assert plan_rows(seqs, shared=True, max_sequences=3)[0] == [0, 5, 10]  # a row holds at most a micro-batch
    for budget in (1, 25, 60):  # a row stays within the budget beyond its first sequence
        for row in plan_rows(seqs, shared=True, max_tokens=budget):
            assert len(row) == 1 or row_length(seqs, row) <= budget
        for mb in plan_micro_batches(seqs, 4, max_tokens=budget, shared=True):  # rows x longest row, or one row
            assert len(mb) == 1 or len(mb) * max(row_length(seqs, r) for r in mb) <= budget
    for mb in plan_micro_batches(seqs, micro_batch_size=8, shared=True):
        assert sum(len(r) for r in mb) <= 8
    shards = split_for_ranks(seqs, 2, shared=True)
    assert sorted(i for s in shards for i in s) == list(range(20))
    assert {i % 5 for i in shards[0]}.isdisjoint({i % 5 for i in shards[1]})  # a prompt's samples stay on one rank
    few = split_for_ranks(seqs[:1] + seqs[5:6] + seqs[10:11] + seqs[15:16], 3, shared=False)
    assert sorted(i for s in few for i in s) == [0, 1, 2, 3]
    one_prompt = [s for i, s in enumerate(seqs) if i % 5 == 0]
    halves = split_for_ranks(one_prompt, 2, shared=True)  # one group, two ranks: the group is halved
    assert sorted(map(len, halves)) == [2, 2]
    planned = micro_batches(seqs, plan_micro_batches(seqs, 8, shared=True), count=5)
    assert sorted(i for mb in planned for i in mb.indices) == list(range(20))
    assert [s for mb in planned for s in mb.sequences if mb.indices] == [seqs[i] for mb in planned for i in mb.indices]
    assert planned[-1].indices == [] and planned[-1].sequences[0].num_loss_tokens == 0


def test_rows_differ_by_route_or_image():
    image = {"pixel_values": torch.ones(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    other = {"pixel_values": torch.zeros(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    seqs = [Sequence(prompt_ids=[1, 2, 3], response_ids=[4], route=r, mm_inputs=m)
            for r, m in [("think", image), ("fast", image), ("think", dict(image)), ("think", other)]]
    assert plan_rows(seqs, shared=True) == [[0, 2], [1], [3]]  # same pixels in another dict share; other pixels do not
    assert LearnerConfig().shared_prefix is True
