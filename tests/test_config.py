"""Config loading: YAML + overrides, unknown keys with suggestions, wrong types, choices, --help."""
import dataclasses
from typing import Optional

import pytest

from home_rl.config import ModelConfig, RouterConfig, field_comments, help_text, load_config, save_config
from home_rl.errors import ConfigError


@dataclasses.dataclass
class Demo:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the model
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)  # the router
    steps: int = 3  # how many steps
    name: Optional[str] = None  # an optional name


def test_defaults_overrides_and_yaml(tmp_path):
    cfg = load_config(Demo, [])
    assert cfg.steps == 3 and cfg.model.path == "smollm2"
    (tmp_path / "c.yaml").write_text("steps: 7\nmodel:\n  dtype: float32\n")
    cfg = load_config(Demo, ["--config", str(tmp_path / "c.yaml"), "router.layer=4", "name=x"])
    assert (cfg.steps, cfg.model.dtype, cfg.router.layer, cfg.name) == (7, "float32", 4, "x")


@pytest.mark.parametrize("arg, message", [
    ("stpes=3", "unknown config key 'stpes' (from command line), did you mean 'steps'?"),
    ("routr.layer=3", "did you mean 'router.layer'?"),
    ("model.pth=x", "did you mean 'model.path'?"),
    ("trainer.x=1", "valid keys here: model, router, steps, name"),
    ("steps=abc", "bad value for 'steps'"),
    ("model.dtype=fp8", "expected one of float32, bfloat16, float16"),
    ("router.pooling=max", "bad value for 'router.pooling'"),
])
def test_bad_keys_and_values_name_the_key(arg, message):
    with pytest.raises(ConfigError) as e:
        load_config(Demo, [arg])
    assert message in str(e.value)


def test_yaml_typo_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  pth: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.pth' \(from .*bad.yaml\), did you mean 'model.path'"):
        load_config(Demo, ["--config", str(path)])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Demo, ["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(Demo, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("model.path", "model.dtype", "router.layer", "router.pooling", "router.hidden_size", "steps", "name"):
        assert key in out
    assert "how many steps" in out and "dtype of the weights" in out
    assert field_comments(RouterConfig)["pooling"].startswith("how prompt positions are pooled")
    assert "usage: prog" in help_text(Demo, "prog")


def test_saved_config_reloads_to_the_same_values(tmp_path):
    cfg = load_config(Demo, ["steps=11", "router.layer=2"])
    path = save_config(cfg, tmp_path)
    assert load_config(Demo, ["--config", str(path)]) == cfg
