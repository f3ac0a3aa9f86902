"""HOME checkpoints load partitioned: under ZeRO-3 each learner builds its share only and is filled one
layer at a time, and what the learners hold is exactly the checkpoint (frozen copies and tied weights
included). In plain torch the same loader streams one tensor at a time and checks every tensor.

Real Ray actors, real DeepSpeed (gloo on CPU), the session's tiny HOME checkpoints.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from home_rl.errors import ModelError
from home_rl.learner import LearnerConfig, LearnerGroup, Sequence
from home_rl.model import HomeModel


def test_plain_load_streams_the_checkpoint_with_frozen_copies(tiny_home):
    folder = tiny_home("qwen2_5_vl")
    state = load_file(folder / "model.safetensors")
    model = HomeModel.from_pretrained(folder, copies={"think_ref": "think"})
    assert model.expert_names == ["fast", "think", "think_ref"]
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        source = name.replace(".think_ref.", ".think.")
        assert torch.equal(tensor, state[source]), name
        assert params[name].requires_grad == (".think_ref." not in name), name


def test_misshapen_tensor_names_the_checkpoint_and_tensor(tiny_home, tmp_path):
    folder = shutil.copytree(tiny_home("qwen2"), tmp_path / "home")
    state = load_file(folder / "model.safetensors")
    key = "base.model.layers.1.mlp.experts.think.up_proj.weight"
    state[key] = state[key][:-1]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match=rf"{folder}.*another shape.*{key}"):
        HomeModel.from_pretrained(folder)


def test_partitioned_load_holds_exactly_the_checkpoint(ray_local, tiny_home):
    folder = tiny_home("qwen2")  # tied embeddings: the LM head is the embedding
    state = load_file(folder / "model.safetensors")
    cfg = LearnerConfig(num_learners=2, zero_stage=3, trainable="think", frozen_copies=["think_ref=think"])
    group = LearnerGroup(cfg, folder, dtype="float32")
    try:
        gathered = dict(group.iter_weights())
        copies = {n for n in gathered if ".experts.think_ref." in n}
        assert copies and set(gathered) - copies == set(state)  # lm_head is no parameter of its own
        for name, tensor in gathered.items():
            assert torch.equal(tensor, state[name.replace(".think_ref.", ".think.")].float()), name
        assert group.info[0]["total"] == sum(t.numel() for t in gathered.values())

        # The logits go through the tied LM head; the copy answers as think does.
        reference = HomeModel.from_pretrained(folder, dtype=torch.float32)
        seq = [Sequence(prompt_ids=[5, 17, 3, 99, 2], response_ids=[7, 11, 13], route=r) for r in ("think", "think_ref")]
        think, ref = group.logits(seq)
        with torch.no_grad():
            want = reference(route="think", input_ids=torch.tensor([seq[0].prompt_ids + seq[0].response_ids])).logits
        assert torch.allclose(think, want[0, 4:7], atol=1e-5)
        assert torch.equal(think, ref)
    finally:
        group.shutdown()
