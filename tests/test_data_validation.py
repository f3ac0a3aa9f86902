"""Bad rows: each kind stops the run (`error`) or is dropped and counted (`skip`), with the row named."""
from __future__ import annotations

import io
import json
import logging

import pytest
import transformers
from PIL import Image

from data_pipelines import BadRowError, DataConfig, load_dataset
from home_rl.config import load_config
from home_rl.errors import ConfigError, HomeRLError


def png(size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "green").save(buf, format="PNG")
    return buf.getvalue()


GOOD = {"id": "good-1", "data_source": "vqa", "prompt": "What colour is it?", "images": ["ok.png"], "answer": "green"}
# kind -> (the bad row, its line in the file as written (None: use the dict), what the message must say)
BAD = {
    "missing image": ({"id": "bad-1", "prompt": "What colour?", "images": ["nope.png"], "answer": "red"},
                      "bad image", r"image file not found: .*nope\.png"),
    "corrupt image": ({"id": "bad-1", "prompt": "What colour?", "images": ["broken.png"], "answer": "red"},
                      "bad image", r"cannot decode image .*broken\.png"),
    "missing answer": ({"id": "bad-1", "prompt": "What colour?", "images": []}, "missing answer",
                       r"missing answer: .*the row has columns: id, prompt, images"),
    "empty answer list": ({"id": "bad-1", "prompt": "What colour?", "answer": []}, "missing answer", "missing answer"),
    "empty prompt": ({"id": "bad-1", "prompt": "  ", "answer": "red"}, "empty prompt", "empty prompt"),
    "no prompt": ({"id": "bad-1", "answer": "red"}, "empty prompt",
                  r"no prompt column 'prompt' \(data.prompt_key names another\); .*the row has columns: id, answer"),
    "empty chat prompt": ({"id": "bad-1", "prompt": [{"role": "system", "content": "hi"}, {"role": "user", "content": ""}],
                           "answer": "red"}, "empty prompt", "empty prompt"),
    "prompt too long": ({"id": "bad-1", "prompt": "count " * 300, "answer": "red"}, "prompt too long",
                        r"prompt is \d+ tokens for the \w+ expert, above data.max_prompt_tokens=100"),
    "image too many tokens": ({"id": "bad-1", "prompt": "What colour?", "images": ["big.png"], "answer": "red"},
                              "prompt too long", r"prompt is 1\d\d tokens for the \w+ expert, above data.max_prompt_tokens=100"),
}


@pytest.fixture(scope="module")
def processor(tiny_model):
    return transformers.AutoProcessor.from_pretrained(tiny_model("qwen2_5_vl"))


def write_data(tmp_path, bad: dict) -> DataConfig:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "broken.png").write_bytes(png()[:50])
    (tmp_path / "big.png").write_bytes(png((600, 600)))
    rows = [GOOD, bad, dict(GOOD, id="good-2")]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(path=str(path), max_prompt_tokens=100)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_error_mode_names_row_file_and_reason(case, tmp_path, processor):
    bad, _, reason = BAD[case]
    cfg = write_data(tmp_path, bad)
    cfg.on_bad_row = "error"
    with pytest.raises(BadRowError, match=r"bad row 'bad-1' in .*data\.jsonl, line 2: " + reason) as info:
        load_dataset(cfg, processor)
    assert info.value.row_id == "bad-1" and info.value.file.endswith("data.jsonl") and info.value.where == "line 2"
    assert "on_bad_row=skip" in str(info.value)
    assert isinstance(info.value, HomeRLError)  # recipes print it as one line


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_skip_mode_drops_counts_and_logs(case, tmp_path, processor, caplog):
    bad, kind, reason = BAD[case]
    cfg = write_data(tmp_path, bad)
    cfg.on_bad_row = "skip"
    with caplog.at_level(logging.WARNING, logger="data_pipelines.dataset"):
        data = load_dataset(cfg, processor)
    assert [r["id"] for r in data.rows] == ["good-1", "good-2"]
    assert data.report.total == 3 and data.report.skipped == 1 and dict(data.report.by_reason) == {kind: 1}
    assert "bad-1" in caplog.text
    assert "1 of 3 rows skipped" in caplog.text


def test_unparseable_line_and_duplicate_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "q", "answer": "1"}) + "\n{oops\n"
                    + json.dumps({"id": "a", "prompt": "q2", "answer": "2"}) + "\n")
    with pytest.raises(BadRowError, match=r"bad row in .*d\.jsonl, line 2: not valid JSON"):
        load_dataset(DataConfig(path=str(path)))
    data = load_dataset(DataConfig(path=str(path), on_bad_row="skip"))
    assert [r["prompt"] for r in data.rows] == ["q"]
    assert dict(data.report.by_reason) == {"unreadable": 1, "duplicate id": 1}


def test_skip_logs_only_the_first_few(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "q"}) + "\n" for i in range(8))
                    + json.dumps({"id": "fine", "prompt": "q", "answer": "a"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="data_pipelines.dataset"):
        data = load_dataset(DataConfig(path=str(path), on_bad_row="skip", log_bad_rows=3))
    assert data.report.skipped == 8 and len(data.report.examples) == 3
    assert "'r2'" in caplog.text and "'r3'" not in caplog.text
    assert "8 of 9 rows skipped (missing answer: 8)" in caplog.text


def test_nothing_usable_and_images_on_a_text_model(tmp_path, tiny_model):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "q", "images": [], "answer": ""}) + "\n")
    with pytest.raises(HomeRLError, match="no usable rows"):
        load_dataset(DataConfig(path=str(path), on_bad_row="skip"))
    (tmp_path / "ok.png").write_bytes(png())
    path.write_text(json.dumps({"id": "img", "prompt": "q", "images": ["ok.png"], "answer": "a"}) + "\n")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    with pytest.raises(BadRowError, match="'img'.*model is text-only"):
        load_dataset(DataConfig(path=str(path)), tok)


def test_data_config_in_a_recipe_schema():
    import dataclasses

    @dataclasses.dataclass
    class Recipe:
        data: DataConfig = dataclasses.field(default_factory=DataConfig)

    cfg = load_config(Recipe, ["data.path=x.jsonl", "data.on_bad_row=skip", "data.max_pixels=1000"])
    assert cfg.data.on_bad_row == "skip" and cfg.data.max_pixels == 1000
    with pytest.raises(ConfigError, match="data.on_bad_row"):
        load_config(Recipe, ["data.on_bad_row=ignore"])
