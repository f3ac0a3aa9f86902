"""One rule for every recipe's lengths (home_rl/context_length.py): a length the user did not set is lowered to fit
the model's context, one the user set beyond it is a one-line ConfigError naming the key. Only config.json is read:
no model, no engine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from home_rl.config import load_config, save_config
from home_rl.errors import ConfigError
from home_rl.router.config import EvaluateConfig
from home_rl.serve.config import ServeConfig
from home_rl.trainer.grpo_config import GRPOThinkConfig
from home_rl.trainer.sft import SFTConfig

CONTEXT = r"the model's context of 512 tokens \(max_position_embeddings in .*/config.json\)"


def model_with_context(folder: Path, context: int = 512, vl: bool = False) -> Path:
    """A folder whose config.json says `context` (nested as a vision-language model nests it with `vl`)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = {"max_position_embeddings": context}
    (folder / "config.json").write_text(json.dumps({"text_config": text} if vl else text))
    return folder


def test_sft_lengths_not_set_fit_the_context_and_set_ones_beyond_it_are_refused(tmp_path):
    model = model_with_context(tmp_path / "m")
    cfg = load_config(SFTConfig, [f"model.path={model}"])
    assert (cfg.data.max_prompt_tokens, cfg.sft.max_response_tokens) == (341, 170)  # 1024 + 512, in proportion
    cfg = load_config(SFTConfig, [f"model.path={model}", "data.max_prompt_tokens=400"])
    assert (cfg.data.max_prompt_tokens, cfg.sft.max_response_tokens) == (400, 112)  # what the user's key leaves
    with pytest.raises(ConfigError, match=rf"^data.max_prompt_tokens=1024 is above {CONTEXT}: lower "
                                          r"data.max_prompt_tokens$"):
        load_config(SFTConfig, [f"model.path={model}", "data.max_prompt_tokens=1024"])
    with pytest.raises(ConfigError, match=r"^data.max_prompt_tokens=300 \+ sft.max_response_tokens=300 = 600 is above"):
        load_config(SFTConfig, [f"model.path={model}", "data.max_prompt_tokens=300", "sft.max_response_tokens=300"])
    with pytest.raises(ConfigError, match=r"^data.max_prompt_tokens=512 leaves no room for sft.max_response_tokens"):
        load_config(SFTConfig, [f"model.path={model}", "data.max_prompt_tokens=512"])
    # a key set in a --config file is the user's as much as one on the command line
    (tmp_path / "mine.yaml").write_text("data:\n  max_prompt_tokens: 1024\n")
    with pytest.raises(ConfigError, match="^data.max_prompt_tokens=1024 is above"):
        load_config(SFTConfig, ["--config", str(tmp_path / "mine.yaml"), f"model.path={model}"])
    # what was fitted is what config.yaml records, and it loads back as it is (every key in it now given)
    cfg = load_config(SFTConfig, [f"model.path={model}"])
    saved = save_config(cfg, tmp_path / "out")
    assert load_config(SFTConfig, ["--config", str(saved)]) == cfg
    assert "max_prompt_tokens: 341" in saved.read_text() and "max_response_tokens: 170" in saved.read_text()


def test_serve_and_rollout_recipes_follow_the_same_rule(tmp_path):
    model = model_with_context(tmp_path / "vl", vl=True)
    cfg = load_config(ServeConfig, [f"checkpoint={model}"])
    assert (cfg.engine.max_model_len, cfg.engine.max_tokens) == (512, 512)
    with pytest.raises(ConfigError, match=rf"^engine.max_model_len=2048 is above {CONTEXT}: lower "
                                          r"engine.max_model_len$"):
        load_config(ServeConfig, [f"checkpoint={model}", "engine.max_model_len=2048"])
    with pytest.raises(ConfigError, match=r"^engine.max_tokens=1024 is above engine.max_model_len=512"):
        load_config(ServeConfig, [f"checkpoint={model}", "engine.max_tokens=1024"])
    assert load_config(ServeConfig, [f"checkpoint={model}", "engine.max_model_len=256"]).engine.max_tokens == 256

    grpo = load_config(GRPOThinkConfig, [f"model.path={model}", f"output_dir={tmp_path / 'grpo'}"])
    assert (grpo.rollout.max_model_len, grpo.data.max_prompt_tokens,
            grpo.rollout.max_response_tokens) == (512, 192, 160)
    with pytest.raises(ConfigError, match=rf"^rollout.max_model_len=4096 is above {CONTEXT}"):
        load_config(GRPOThinkConfig, [f"model.path={model}", "rollout.max_model_len=4096"])
    grpo = load_config(GRPOThinkConfig, [f"model.path={model}", "rollout.max_model_len=256"])
    assert (grpo.data.max_prompt_tokens, grpo.rollout.max_response_tokens) == (139, 116)  # 192 + 160 into 256
    with pytest.raises(ConfigError, match=r"^data.max_prompt_tokens=192 \+ rollout.max_response_tokens=160 = 352 is "
                                          r"above rollout.max_model_len=256: lower .*on_long_prompt=truncate\|skip$"):
        load_config(GRPOThinkConfig, [f"model.path={model}", "rollout.max_model_len=256", "data.max_prompt_tokens=192",
                                      "rollout.max_response_tokens=160"])
    evaluation = load_config(EvaluateConfig, [f"checkpoint={model}"])
    assert (evaluation.rollout.max_model_len, evaluation.data.max_prompt_tokens,
            evaluation.rollout.max_response_tokens) == (512, 442, 69)  # 1024 + 160 into 512


def test_a_model_whose_context_is_not_known_yet_keeps_the_lengths(tmp_path):
    cfg = load_config(ServeConfig, [f"checkpoint={tmp_path / 'not_trained_yet'}", "engine.max_model_len=100000"])
    assert cfg.engine.max_model_len == 100000  # vLLM and the memory plan read the model when it exists
