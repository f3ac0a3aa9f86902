"""The DeepSpeed ZeRO-3 learner group: it computes what plain torch computes, trains only what it is told,
exports weights that reproduce its logits, and restores its state exactly.

Real Ray actors, real DeepSpeed (gloo on CPU), tiny random models. Each group is started once.
"""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from home_rl.errors import ConfigError, ray_get
from home_rl.learner import LearnerConfig, LearnerGroup, Sequence
from home_rl.learner.batch import collate
from home_rl.learner.plan import check_plan, micro_batches, plan_micro_batches, split_for_ranks
from home_rl.learner.config import trainable_patterns
from home_rl.learner.worker import MicroBatchPlanError
from home_rl.learner.losses import token_log_probs
from home_rl.learner.optim import WarmupSchedule, param_groups, select_trainable

STEPS = 3
# Clipping (grad norms are ~4 here), warm-up, cosine decay and weight decay are all active.
OPTIM = dict(lr=1e-2, warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
             micro_batch_size=3)


def make_batch(n: int, seed: int, routes: bool = False, prompts: int = 0) -> list[Sequence]:
    """n random sequences; with `prompts`, sequence i has the prompt of sequence i % prompts (GRPO's groups)."""
    rng = random.Random(seed)
    batch = []
    for i in range(n):
        route = rng.choice(["think", "fast"]) if routes else None
        response = [rng.randrange(600) for _ in range(rng.randrange(2, 12))]
        mask = [float(rng.random() > 0.2) for _ in response]
        prompt = [rng.randrange(600) for _ in range(rng.randrange(2, 14))]
        if prompts and i >= prompts:
            prompt, route = batch[i % prompts].prompt_ids, batch[i % prompts].route
        batch.append(Sequence(prompt_ids=prompt,
                              response_ids=response, loss_mask=mask, route=route,
                              router_label=None if route is None else ["fast", "think"].index(route)))
    return batch


@pytest.fixture(scope="module")
def dense_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def home_dir(tiny_home):
    return tiny_home("qwen2")


def sequence_log_probs(model, seq: Sequence, **kwargs) -> torch.Tensor:
    """Log-probs of the response tokens from an unpadded forward pass of one sequence."""
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    logits = model(input_ids=ids, **kwargs).logits[0].float()
    P, R = len(seq.prompt_ids), len(seq.response_ids)
    return torch.log_softmax(logits[P - 1:P + R - 1], -1).gather(1, torch.tensor(seq.response_ids)[:, None])[:, 0]


def torch_reference_losses(model_dir, batch: list[Sequence], cfg: LearnerConfig, steps: int) -> list[tuple[float, float]]:
    """(SFT loss, gradient norm) per step of plain single-process torch: one sequence at a time, no padding,
    the same AdamW and schedule."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    select_trainable(model, trainable_patterns(cfg.trainable))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(cfg.warmup_steps, steps, cfg.lr_schedule, cfg.min_lr_ratio))
    total_tokens = sum(s.num_loss_tokens for s in batch)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(-(sequence_log_probs(model, s) * torch.tensor(s.loss_mask)).sum() for s in batch) / total_tokens
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append((loss.item(), norm.item()))
    return losses


# ----------------------------------------------------------------------------- pure functions


def test_collate_aligns_targets_with_unpadded_log_probs(dense_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    batch = make_batch(5, seed=1)
    mb = collate(batch, pad_id=0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in mb.model_inputs().items()}).logits
        padded, _ = token_log_probs(logits, mb.targets)
        for seq, got in zip(batch, mb.per_sequence(padded)):
            assert torch.allclose(got, sequence_log_probs(model, seq), atol=1e-5)
    assert mb.loss_mask.sum().item() == sum(s.num_loss_tokens for s in batch)


def test_split_and_micro_batches_keep_every_sequence_once():
    batch = make_batch(11, seed=2)
    shards = split_for_ranks(batch, 3)
    assert sorted(i for s in shards for i in s) == list(range(11))
    shard = [batch[i] for i in shards[0]]
    chunks = micro_batches(shard, plan_micro_batches(shard, 2), count=4)
    assert len(chunks) == 4  # filled up with masked-out copies so that every rank runs the same passes
    real = [i for mb in chunks for i in mb.indices]
    assert sorted(real) == list(range(len(shards[0])))
    fillers = [mb.sequences for mb in chunks if not mb.indices]
    assert fillers and all(s.num_loss_tokens == 0 for seqs in fillers for s in seqs)
    with pytest.raises(ValueError, match="cannot be split"):
        split_for_ranks(batch[:2], 3)


def test_plan_check_names_what_disagrees_with_the_shard():
    shard = make_batch(7, seed=4, prompts=3)
    plan = plan_micro_batches(shard, 3)
    assert check_plan(shard, plan, len(plan), 3) is None
    assert "missing [6]" in check_plan(shard[:7], plan_micro_batches(shard[:6], 3), 3, 3)  # a sequence left out
    assert "out of range or repeated [6]" in check_plan(shard[:6], plan, 3, 3)  # a plan for a longer shard
    assert "more than the 2 every rank runs" in check_plan(shard, plan, 2, 3)
    assert "holds 4 sequences, above 3" in check_plan(shard, [[[0], [1], [2], [3]], [[4], [5], [6]]], 2, 3)
    assert "needs learner.shared_prefix" in check_plan(shard, [[[0, 3]], [[1], [2], [4]], [[5], [6]]], 3, 3)
    shared = plan_micro_batches(shard, 8, shared=True)
    assert check_plan(shard, shared, len(shared), 8, shared=True) is None
    assert "do not share one prompt" in check_plan(shard, [[[0, 1]], [[2], [3], [4], [5], [6]]], 2, 8, shared=True)


def test_token_budget_micro_batches_bound_padded_tokens():
    batch = make_batch(40, seed=5)
    for budget in (1, 30, 64, 200):
        chunks = [[i for row in rows for i in row] for rows in plan_micro_batches(batch, 3, max_tokens=budget)]
        assert sorted(i for c in chunks for i in c) == list(range(40))
        for c in chunks:  # padded size within the budget, or one sequence that alone is longer
            longest = max(len(batch[i]) for i in c)
            assert len(c) * longest <= budget or len(c) == 1, (budget, [len(batch[i]) for i in c])
        if budget == 200:  # packing fills: no two neighbours could have been one micro-batch
            for a, b in zip(chunks, chunks[1:]):
                assert (len(a) + len(b)) * max(len(batch[i]) for i in a + b) > budget
    assert plan_micro_batches(batch, 3) == plan_micro_batches(batch, 3, max_tokens=0)
    assert [len(c) for c in plan_micro_batches(batch, 3)] == [3] * 13 + [1]
    assert all(len(row) == 1 for c in plan_micro_batches(batch, 3, shared=False) for row in c)
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        LearnerConfig(max_tokens_per_micro_batch=-1)


def test_schedule_and_trainable_presets(dense_dir):
    s = WarmupSchedule(warmup_steps=2, total_steps=6, kind="cosine", min_ratio=0.1)
    assert [round(s(i), 4) for i in range(6)] == [0.3333, 0.6667, 1.0, 0.775, 0.325, 0.1]  # cos(pi/3) = 0.5
    assert trainable_patterns("think") == ["*.experts.think.*"]
    assert trainable_patterns(["router", "base.model.norm.*"]) == ["router.*", "base.model.norm.*"]
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_trainable(model, trainable_patterns("think"))  # a dense model has no experts
    with pytest.raises(ConfigError):
        LearnerConfig(trainable=3)


def test_shared_preset_is_everything_but_experts_and_router(home_dir):
    from home_rl.model import HomeModel

    model = HomeModel.from_pretrained(home_dir)
    names = [n for n, _ in model.named_parameters()]
    trainable = set(select_trainable(model, trainable_patterns("think,shared"), never=("*.experts.think_ref.*",)))
    assert {n for n in names if ".experts.think." in n} <= trainable
    assert not any(".experts.fast." in n or n.startswith("router.") for n in trainable)
    shared = [n for n in names if ".experts." not in n and not n.startswith("router.")]
    assert shared and set(shared) <= trainable  # attention, norms, embeddings
    assert set(select_trainable(model, ["*.self_attn.* -*.layers.0.*"])) == {
        n for n in names if ".self_attn." in n and ".layers.0." not in n}


# ----------------------------------------------------------------------------- dense groups vs torch


@pytest.fixture(scope="module")
def reference_losses(dense_dir):
    return torch_reference_losses(dense_dir, make_batch(11, seed=0, prompts=4), LearnerConfig(**OPTIM), STEPS)


# 11 sequences of 4 prompts (3 samples each, one with 2). Shared, the rows hold a prompt's samples
# (at most OPTIM's 3 sequences, or 44 tokens beyond a row's first sequence); 2 learners split the prompts
# so that rank 1 runs a filler micro-batch; unshared, every sequence is a row of its own.
@pytest.mark.parametrize("num_learners,max_tokens,shared", [(1, 0, True), (2, 44, True), (2, 0, False)],
                         ids=["1-learner", "2-learners-token-budget", "2-learners-unshared"])
def test_learner_group_matches_single_process_torch(ray_local, dense_dir, reference_losses, num_learners, max_tokens,
                                                     shared, tmp_path):
    batch = make_batch(11, seed=0, prompts=4)
    cfg = LearnerConfig(num_learners=num_learners, max_tokens_per_micro_batch=max_tokens, shared_prefix=shared,
                        **OPTIM)
    group = LearnerGroup(cfg, dense_dir, dtype="float32", total_steps=STEPS + 2)
    try:
        steps = [group.train_step(batch) for _ in range(STEPS)]
        computed, every = steps[0]["tokens_computed"], sum(len(s) for s in batch)
        once = every - sum(len(s.prompt_ids) for s in batch[4:])  # each of the 4 prompts once
        if not shared:
            assert computed == every
        else:  # a token budget may split a prompt's samples over two rows
            assert computed == once if not max_tokens else once <= computed < every
        losses, norms = [m["loss"] for m in steps], [m["grad_norm"] for m in steps]
        assert losses == pytest.approx([loss for loss, _ in reference_losses], abs=1e-4), (losses, reference_losses)
        assert norms == pytest.approx([norm for _, norm in reference_losses], abs=1e-4), (norms, reference_losses)
        assert losses[-1] < losses[0]

        # Save, train on, restore: the same steps give the same losses again.
        group.save_checkpoint(tmp_path / "ckpt")
        after = [group.train_step(batch)["loss"] for _ in range(2)]
        assert group.load_checkpoint(tmp_path / "ckpt") == STEPS
        again = [group.train_step(batch)["loss"] for _ in range(2)]
        assert again == pytest.approx(after, abs=1e-6)
        if num_learners == 2:
            # The final checkpoint is a dense folder that transformers loads, with the learner's weights.
            out = group.save_model(tmp_path / "final")
            model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            gathered = dict(group.iter_weights())
            for name, p in model.named_parameters():
                assert torch.equal(p, gathered[name]), name

            # The driver plans every rank's micro-batches once; a rank whose plan disagrees with its shard refuses
            # it before any collective, and so does the other rank (none is left waiting in a ZeRO-3 gather).
            shards, plans, count = group._shards(batch)
            refs = [a.log_probs.remote([batch[i] for i in shard], plan, count)
                    for a, shard, plan in zip(group.actors, shards, [plans[0][1:], plans[1]])]
            with pytest.raises(MicroBatchPlanError, match="rank 0: the micro-batch plan does not fit its shard: .*missing"):
                ray_get(refs[0])
            with pytest.raises(MicroBatchPlanError, match="rank 1: .*another rank refused"):
                ray_get(refs[1])
            assert len(group.log_probs(batch)) == len(batch)  # the group goes on
            assert transformers.AutoTokenizer.from_pretrained(out).chat_template
    finally:
        group.shutdown()


# ----------------------------------------------------------------------------- HOME groups


def test_think_only_training_keeps_the_rest_bit_identical_and_exports_the_think_view(ray_local, dense_dir, home_dir,
                                                                                     tmp_path):
    from home_rl.model import HomeModel

    batch = make_batch(10, seed=3, routes=True)
    cfg = LearnerConfig(num_learners=2, trainable="think", lr=1e-2, micro_batch_size=3)
    group = LearnerGroup(cfg, home_dir, dtype="float32", total_steps=2)
    try:
        before = dict(group.iter_weights())
        for _ in range(2):
            metrics = group.train_step(batch)
        after = dict(group.iter_weights())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        think = {n for n in before if ".experts.think." in n}
        assert changed == think and think  # every think weight moved; shared, fast and router did not
        assert metrics["grad_norm"] > 0

        # The sync path: only the think expert, layer by layer, under the dense model's names.
        chunks = ray_local.get(group.actors[0].weight_chunks.remote("think", True))
        assert len(chunks) == 2 and all(len({n.split(".layers.")[1].split(".")[0] for n in c}) == 1 for c in chunks)
        synced = dict(group.iter_weights(view="think", only_trainable=True))
        assert sorted(synced) == sorted(n.replace("base.", "", 1).replace(".experts.think", "") for n in think)

        # The gathered think view, loaded into a dense model, reproduces the learner's logits.
        view = dict(group.iter_weights(view="think"))
        dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
        missing, unexpected = dense.load_state_dict(view, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
        think_batch = [Sequence(s.prompt_ids, s.response_ids, route="think") for s in batch]
        learner_logits = group.logits(think_batch)
        with torch.no_grad():
            for seq, got in zip(think_batch, learner_logits):
                ids = torch.tensor([seq.prompt_ids + seq.response_ids])
                P, R = len(seq.prompt_ids), len(seq.response_ids)
                want = dense(input_ids=ids).logits[0, P - 1:P + R - 1]
                assert (got - want).abs().max().item() <= 1e-5
            log_probs = group.log_probs(think_batch)
            for seq, lp in zip(think_batch, log_probs):
                assert torch.allclose(lp, sequence_log_probs(dense, seq), atol=1e-5)

        # The final checkpoint is a HOME checkpoint holding the trained weights.
        home = HomeModel.from_pretrained(group.save_model(tmp_path / "final"), dtype=torch.float32)
        state = home.state_dict()
        assert all(torch.equal(state[n], after[n]) for n in after)
    finally:
        group.shutdown()


def test_router_only_training_with_router_cross_entropy(ray_local, home_dir):
    batch = make_batch(8, seed=4, routes=True)
    cfg = LearnerConfig(num_learners=1, trainable="router", lr=1e-2, micro_batch_size=4)
    group = LearnerGroup(cfg, home_dir, dtype="float32", total_steps=4)
    try:
        before = dict(group.iter_weights())
        history = [group.train_step(batch, router_loss_weight=1.0) for _ in range(4)]
        after = dict(group.iter_weights())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == {n for n in before if n.startswith("router.")}
        assert history[0]["router_loss"] == pytest.approx(0.6931, abs=1e-3)  # an untrained router is undecided
        assert history[-1]["router_loss"] < history[0]["router_loss"]
        assert history[-1]["token_loss"] == pytest.approx(history[0]["token_loss"], abs=1e-6)  # experts frozen
        assert 0.0 <= history[-1]["router_acc"] <= 1.0
    finally:
        group.shutdown()


def test_zero_stages_0_1_2_train_gather_save_and_restore_alike(ray_local, home_dir, tmp_path):
    """learner.zero_stage=auto may pick any stage: the lower ones take the same code paths (think-only updates with
    a frozen copy, layer-by-layer gathers, engine checkpoints, the final HOME checkpoint) and the same losses."""
    from home_rl.model import HomeModel

    batch = make_batch(8, seed=5, routes=True)
    losses, norms = {}, {}
    for stage in (0, 1, 2):
        cfg = LearnerConfig(num_learners=2, zero_stage=stage, trainable="think", frozen_copies=["think_ref=think"],
                            lr=1e-2, micro_batch_size=3)
        group = LearnerGroup(cfg, home_dir, dtype="float32", total_steps=4)
        try:
            before = dict(group.iter_weights())
            steps = [group.train_step(batch) for _ in range(2)]
            losses[stage] = [m["loss"] for m in steps]
            norms[stage] = [m["grad_norm"] for m in steps]  # ZeRO-0 in fp32: the learner's own clip reports it
            after = dict(group.iter_weights())
            changed = {n for n in before if not torch.equal(before[n], after[n])}
            assert changed == {n for n in before if ".experts.think." in n}, stage
            synced = dict(group.iter_weights(view="think", only_trainable=True))
            assert len(synced) == len(changed) and not any("think_ref" in n for n in synced)
            group.save_checkpoint(tmp_path / f"ckpt{stage}")
            next_loss = group.train_step(batch)["loss"]
            assert group.load_checkpoint(tmp_path / f"ckpt{stage}") == 2
            assert group.train_step(batch)["loss"] == pytest.approx(next_loss, abs=1e-6)
            if stage == 0:
                home = HomeModel.from_pretrained(group.save_model(tmp_path / "final"), dtype=torch.float32)
                assert "think_ref" not in home.expert_names
        finally:
            group.shutdown()
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)
    assert norms[0][0] > 0 and norms[1] == pytest.approx(norms[0], abs=1e-5) and norms[2] == pytest.approx(norms[0], abs=1e-5)
