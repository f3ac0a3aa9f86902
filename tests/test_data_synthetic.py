"""Synthetic data: byte-identical for a seed, correct worked solutions, readable by every consumer."""
from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import DataConfig, load_dataset, load_image, read_rows, target_response
from data_pipelines.synthetic import generate, make_rows, split_counts
from data_pipelines.templates import TEMPLATES
from home_rl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EQUATION = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)\.")
STEP = re.compile(r"(gets (\d+) more|gives away (\d+)|has (\d+) times as many): (\d+) ([+\-*]) (\d+) = (\d+)\.")


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_math_trace(think: str, answer: str, steps: int, question: str = "") -> None:
    """One line per step: the step's words as the question writes them, then a correct equation of the chain."""
    lines = STEP.findall(think)
    assert len(lines) == steps and " ".join(f"{words}: {a} {op} {b} = {c}." for words, *_, a, op, b, c in lines) == think
    previous = None
    for words, plus, minus, times, a, op, b, c in lines:
        assert (plus, minus, times)[("+", "-", "*").index(op)] == b  # the words name this equation's operand
        assert not question or f" {words}." in question
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert previous is None or a == previous  # a chain: each step starts from the last result
        assert 0 <= c <= 999
        previous = c
    assert str(previous) == answer


def test_cli_same_seed_gives_byte_identical_files(tmp_path):
    def run(seed, out):
        subprocess.run([sys.executable, "-m", "data_pipelines.synthetic", "--task", "mix", "--n", "24", "--seed", str(seed),
                        "--out", str(out), "--image-fraction", "0.5"], check=True, cwd=REPO, capture_output=True)
        return files_of(out)

    first, second, other = run(3, tmp_path / "a"), run(3, tmp_path / "b"), run(4, tmp_path / "c")
    assert first == second
    assert first["data.jsonl"] != other["data.jsonl"]
    assert any(name.startswith("images/") for name in first)
    rows = read_rows(tmp_path / "a")
    assert {r["data_source"] for r in rows} == {"math", "ocr", "vqa", "extract"}
    for row in rows:  # every referenced image exists under DIR and decodes
        for ref in row["images"]:
            assert Path(ref).is_relative_to((tmp_path / "a").resolve())
            load_image(ref)


def test_cli_rejects_unknown_levels(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_pipelines.synthetic", "--task", "ocr", "--n", "2", "--out",
                           str(tmp_path), "--levels", "7"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "levels [7] do not exist for ocr" in proc.stderr


@pytest.mark.parametrize("task", ["math", "arith", "ocr", "vqa", "extract"])
def test_each_family_is_deterministic_and_loads_clean(task, tmp_path):
    generate(task, 30, 7, tmp_path / "a", image_fraction=0.3)
    generate(task, 30, 7, tmp_path / "b", image_fraction=0.3)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    data = load_dataset(DataConfig(path=str(tmp_path / "a")))
    assert len(data.rows) == 30 and data.report.skipped == 0
    for row in data.rows:
        assert row["data_source"] == task and row["id"].startswith(f"{task}-7-")
        assert {"steps", "difficulty"} <= set(row["extra_info"])
        assert row["solution"]["answer"] == row["answer"] and row["solution"]["think"]
        assert target_response(row, "think") == f"<think>{row['solution']['think']}</think><answer>{row['answer']}</answer>"
        assert target_response(row, "fast") == f"<think></think><answer>{row['answer']}</answer>"


def test_math_problems_are_correct_chains(tmp_path):
    rows, files = make_rows("math", 300, 0, image_fraction=0.25)
    steps = collections.Counter(r["extra_info"]["steps"] for r in rows)
    assert set(steps) == {1, 2, 3, 4, 5, 6}
    for row in rows:
        check_math_trace(row["solution"]["think"], row["answer"], row["extra_info"]["steps"],
                         row["prompt"] if row["extra_info"]["modality"] == "text" else "")
        if row["extra_info"]["modality"] == "text":
            assert row["images"] == [] and row["prompt"].count("Then") == row["extra_info"]["steps"]
            assert row["prompt"].split(" has ")[1].split()[0] == EQUATION.findall(row["solution"]["think"])[0][0]
        else:
            assert row["prompt"] == "Solve the math problem in the image." and files[row["images"][0]][:4] == b"\x89PNG"
    images = sum(r["extra_info"]["modality"] == "image" for r in rows)
    assert 40 < images < 110
    text_only, _ = make_rows("math", 300, 0, image_fraction=0.0)
    for with_images, plain in zip(rows, text_only):  # the fraction changes the medium, never the problem
        assert with_images["solution"] == plain["solution"]
    easy, _ = make_rows("math", 50, 0, levels=[1, 2])
    assert {r["extra_info"]["steps"] for r in easy} == {1, 2}


def test_template_examples_follow_the_generators():
    for example in TEMPLATES["math"].examples:
        check_math_trace(example.think, example.answer, example.think.count("="), example.question)
        assert example.question.endswith("have now?")
    rows, _ = make_rows("extract", 60, 0)
    kinds = {r["extra_info"]["kind"]: r for r in rows}
    assert set(kinds) == {"word", "code", "field"}
    word_example = TEMPLATES["extract"].examples[0]
    assert word_example.question.startswith("Which word comes after ") and kinds["word"]["prompt"].startswith("Which word comes after ")
    assert word_example.think.startswith("After ") and kinds["word"]["solution"]["think"].startswith("After ")


def test_arith_questions_are_one_correct_step():
    rows, files = make_rows("arith", 90, 4)
    assert files == {} and {r["extra_info"]["op"] for r in rows} == {"+", "-", "*"}
    for row in rows:
        a, op, b, c = EQUATION.fullmatch(row["solution"]["think"]).groups()
        assert f"{a} {op} {b}" in row["prompt"] and c == row["answer"]
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] and int(c) >= 1
    for example in TEMPLATES["arith"].examples:
        a, op, b, c = EQUATION.fullmatch(example.think).groups()
        assert f"{a} {op} {b}" in example.question and c == example.answer


def test_extract_answers_stand_in_the_prompt():
    rows, files = make_rows("extract", 90, 1)
    assert files == {}
    for row in rows:
        assert row["images"] == [] and row["answer"] in row["prompt"]
        assert row["solution"]["think"].endswith(f"{row['answer']}.")
        if row["extra_info"]["kind"] == "word":
            key = row["prompt"].split("comes after ")[1].split()[0]
            words = row["prompt"].split(": ")[1].split()
            assert words[words.index(key) + 1] == row["answer"]


def test_ocr_images_show_the_answer_text(tmp_path):
    rows, files = make_rows("ocr", 30, 2)
    for row in rows:
        image = load_image(files[row["images"][0]])
        assert image.width > 20 and image.height > 20
        assert 1 <= len(row["answer"].split()) <= row["extra_info"]["difficulty"]
        assert row["solution"]["think"] == f"The image shows the text: {row['answer']}."


def test_vqa_uses_easy_vqa_images_and_answers():
    import easy_vqa

    rows, files = make_rows("vqa", 40, 3)
    paths = easy_vqa.get_train_image_paths()
    assert {r["extra_info"]["difficulty"] for r in rows} == {1, 2}
    for row in rows:
        assert row["answer"] in easy_vqa.get_answers()
        assert (row["answer"] in ("yes", "no")) == (row["extra_info"]["difficulty"] == 1)
        assert files[row["images"][0]] == Path(paths[row["extra_info"]["image_id"]]).read_bytes()
        if row["prompt"].startswith("What color") or row["prompt"].startswith("What shape"):
            assert row["answer"] in row["solution"]["think"]


def test_mix_ratio_and_family_streams():
    rows, _ = make_rows("mix", 40, 5, ratio={"math": 3, "extract": 1})
    counts = collections.Counter(r["data_source"] for r in rows)
    assert counts == {"math": 30, "extract": 10}
    assert len({r["id"] for r in rows}) == 40
    alone, _ = make_rows("math", 30, 5)
    assert sorted((r for r in rows if r["data_source"] == "math"), key=lambda r: r["id"]) == alone
    assert split_counts(10, {"math": 1, "ocr": 1, "vqa": 1}) == {"math": 4, "ocr": 3, "vqa": 3}
    with pytest.raises(ConfigError, match="bad mix ratio"):
        split_counts(10, {"poems": 1})
    with pytest.raises(ConfigError, match="unknown synthetic task"):
        make_rows("poems", 1, 0)
