"""Readers and the row schema: JSONL, Parquet, datasets' save_to_disk, verl-style Parquet; images."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import BadRowError, ImageLoadError, load_image, read_rows, resize_for_vision
from home_rl.errors import HomeRLError


def png(color="red", size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_jsonl_rows_and_relative_image_paths(tmp_path):
    data_dir = tmp_path / "set"
    (data_dir / "pics").mkdir(parents=True)
    (data_dir / "pics" / "a.png").write_bytes(png("blue"))
    rows = [
        {"id": "r1", "data_source": "vqa", "prompt": "What colour?", "images": ["pics/a.png"], "answer": "blue"},
        {"id": 7, "data_source": "math", "prompt": [{"role": "user", "content": "1 + 1?"}], "answer": ["2", "two"],
         "extra_info": {"steps": 1}},
    ]
    (data_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    got = read_rows(data_dir / "train.jsonl")
    assert [r["id"] for r in got] == ["r1", "7"]
    assert got[0]["images"] == [str((data_dir / "pics" / "a.png").resolve())]  # against the data file, not the cwd
    assert load_image(got[0]["images"][0]).getpixel((0, 0)) == (0, 0, 255)
    assert got[1]["answer"] == ["2", "two"] and got[1]["images"] == [] and got[1]["extra_info"] == {"steps": 1}
    assert got[1]["prompt"] == [{"role": "user", "content": "1 + 1?"}]


def test_folder_with_data_jsonl_and_max_rows(tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "prompt": "q", "answer": str(i)}) + "\n" for i in range(5)))
    rows = read_rows(tmp_path, max_rows=3)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[0]["data_source"] == "unknown"


def test_broken_json_line_names_line_and_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "ok", "prompt": "q", "answer": "a"}) + "\n{not json\n")
    with pytest.raises(BadRowError, match=r"bad row in .*d\.jsonl, line 2: not valid JSON: Expecting property name"):
        read_rows(path)


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(HomeRLError, match="unsupported data file"):
        read_rows(tmp_path / "d.csv")
    with pytest.raises(HomeRLError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HomeRLError, match="no data found"):
        read_rows(tmp_path / "empty")


def test_parquet_with_bytes_and_relative_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sub = tmp_path / "parquet"
    sub.mkdir()
    (sub / "b.png").write_bytes(png("green"))
    table = pa.table({
        "id": ["p1", "p2"],
        "data_source": ["ocr", "ocr"],
        "prompt": ["Read it.", "Read that."],
        "images": [[png("red")], []],
        "answer": ["x", "y"],
    })
    pq.write_table(table, sub / "train.parquet")
    rows = read_rows(sub / "train.parquet")
    assert [r["id"] for r in rows] == ["p1", "p2"]
    assert isinstance(rows[0]["images"][0], bytes)
    assert load_image(rows[0]["images"][0]).getpixel((1, 1)) == (255, 0, 0)

    pq.write_table(pa.table({"id": ["p3"], "prompt": ["q"], "images": [["b.png"]], "answer": ["z"]}),
                   sub / "more.parquet")
    rows = read_rows(sub)  # a folder of parquet files, read in name order
    assert [r["id"] for r in rows] == ["p3", "p1", "p2"]
    assert rows[0]["images"] == [str((sub / "b.png").resolve())]


def test_verl_style_parquet(tmp_path):
    """verl's preprocessed rows: chat-message prompt with an <image> marker, reward_model.ground_truth, image records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{
        "data_source": "hiyouga/geometry3k",
        "prompt": [{"role": "user", "content": "<image>Find x. Put the answer in \\boxed{}."}],
        "images": [{"bytes": png("white"), "path": None}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "12"},
        "extra_info": {"split": "train", "index": 41, "answer": "12", "question": "Find x."},
    }, {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}],
        "images": [],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "5"},
        "extra_info": {"split": "train", "index": 42, "answer": "5", "question": "2 + 3?"},
    }]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "verl.parquet")
    got = read_rows(tmp_path / "verl.parquet")
    assert [r["id"] for r in got] == ["verl-41", "verl-42"]
    assert [r["answer"] for r in got] == ["12", "5"]
    assert got[0]["data_source"] == "hiyouga/geometry3k"
    assert got[0]["prompt"][0]["content"].startswith("<image>Find x.")
    assert isinstance(got[0]["images"][0], bytes) and load_image(got[0]["images"][0]).size == (40, 30)
    assert got[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert got[1]["extra_info"]["index"] == 42


def test_saved_hf_dataset(tmp_path):
    import datasets

    (tmp_path / "img.png").write_bytes(png("yellow"))
    features = datasets.Features({
        "id": datasets.Value("string"), "data_source": datasets.Value("string"), "prompt": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image()), "answer": datasets.Sequence(datasets.Value("string")),
    })
    ds = datasets.Dataset.from_dict({
        "id": ["h1", "h2"], "data_source": ["vqa", "vqa"], "prompt": ["What colour?", "Any shape?"],
        "images": [[str(tmp_path / "img.png")], []], "answer": [["yellow"], ["no", "none"]],
    }, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = read_rows(tmp_path / "saved")
    assert [r["id"] for r in rows] == ["h1", "h2"]
    assert rows[1]["answer"] == ["no", "none"]
    assert load_image(rows[0]["images"][0]).getpixel((0, 0)) == (255, 255, 0)

    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert [r["id"] for r in read_rows(tmp_path / "dict")] == ["h1", "h2"]  # the train split


def test_load_image_converts_to_rgb_and_reports_bad_images(tmp_path):
    assert load_image(png("red", mode="RGBA")).mode == "RGB"
    assert load_image(png(128, mode="L")).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image(png()[:60])  # truncated: fails at decode time, not later in the processor
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("size", [(40, 30), (1000, 700), (28, 28), (300, 20)])
def test_resize_within_budget_on_the_patch_grid(size):
    min_pixels, max_pixels = 28 * 28 * 4, 28 * 28 * 64
    out = resize_for_vision(Image.new("RGB", size), min_pixels, max_pixels)
    assert out.width % 28 == 0 and out.height % 28 == 0
    assert min_pixels <= out.width * out.height <= max_pixels
    assert resize_for_vision(out, min_pixels, max_pixels) is out  # an image that fits is left alone


def test_single_image_column_and_in_memory_images(tmp_path):
    from data_pipelines.schema import normalize_row

    (tmp_path / "one.png").write_bytes(png("red"))
    row = normalize_row({"id": "a", "prompt": "q", "image": "one.png", "answer": 3}, tmp_path, 0, "f.jsonl")
    assert row["images"] == [str((tmp_path / "one.png").resolve())] and row["answer"] == "3"
    row = normalize_row({"prompt": "q", "images": Image.new("RGB", (5, 5), "blue"), "answer": "b"}, tmp_path, 4, "f.jsonl")
    assert row["id"] == "f-4" and load_image(row["images"][0]).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(BadRowError, match="a row must be an object"):
        normalize_row(["not", "a", "dict"], tmp_path, 0, "f.jsonl")
