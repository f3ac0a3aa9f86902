"""Data from verl, TRL, OpenRLHF and EasyR1 read unchanged (issue #17, the data half).

verl folders of train/test splits, TRL conversational rows with a `solution` column, named prompt and
answer columns, GSM8K's `#### 72` answers, non-UTF-8 bytes, and 1-based row names everywhere; the
recipes' cases run through the CLI and stop before any Ray actor starts (exit 2, one line).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import BadRowError, DataConfig, Splits, find_splits, load_dataset, read_rows, render_prompt
from home_rl.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def verl_row(index: int, split: str, answer: str | None = "5", **extra) -> dict:
    """A row as verl's examples/data_preprocess/gsm8k.py writes it."""
    return {"data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"Question {index}: 2 + 3? Let's think step by step."}],
            "ability": "math", "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": index, **extra}}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return path


def trl_row(i: int, solution: str = "5") -> dict:
    """A TRL conversational row: chat-message prompt, the answer in `solution` (as trl-lib's math sets)."""
    return {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + 5?"}],
            "solution": solution}


def cli(recipe: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "recipes" / recipe), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The recipe's one-line error: exit 2, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def tiny_home(tiny_model, tmp_path_factory):
    from home_rl.model import upcycle

    return upcycle(tiny_model("qwen2")).save_pretrained(tmp_path_factory.mktemp("peers") / "home")


# ----------------------------------------------------------------------------- verl folders of splits


def test_a_split_folder_reads_its_train_split_with_a_warning(tmp_path, caplog):
    import datasets

    pq_dir = tmp_path / "gsm8k"
    write_parquet(pq_dir / "train.parquet", [verl_row(i, "train") for i in range(3)])
    write_parquet(pq_dir / "test.parquet", [verl_row(i, "test") for i in range(2)])
    assert find_splits(pq_dir) == find_splits(str(pq_dir)) and find_splits(pq_dir).heldout == pq_dir / "test.parquet"
    with caplog.at_level(logging.WARNING, logger="data_pipelines.readers"):
        rows = read_rows(pq_dir)
    assert [r["id"] for r in rows] == ["train-0", "train-1", "train-2"]  # the test split is not trained on
    assert "reading train.parquet only (test.parquet is held out" in caplog.text

    jl_dir = tmp_path / "jsonl"
    write_jsonl(jl_dir / "train.jsonl", [trl_row(i) for i in range(3)])
    write_jsonl(jl_dir / "validation.jsonl", [trl_row(9)])
    assert find_splits(jl_dir) == Splits(jl_dir / "train.jsonl", jl_dir / "validation.jsonl")
    assert len(read_rows(jl_dir)) == 3

    ds = datasets.Dataset.from_list([{"prompt": "q", "answer": "1"}, {"prompt": "r", "answer": "2"}])
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert find_splits(tmp_path / "saved").heldout == tmp_path / "saved" / "test"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipelines.readers"):
        assert len(read_rows(tmp_path / "saved")) == 2
    assert "holds splits train, test: reading train only" in caplog.text

    write_parquet(tmp_path / "one" / "train.parquet", [verl_row(0, "train")])  # no held-out split: a plain folder
    assert find_splits(tmp_path / "one") is None and find_splits(pq_dir / "train.parquet") is None


def test_grpo_config_trains_on_train_and_evaluates_on_test(tmp_path):
    from home_rl.trainer.grpo_config import GRPOThinkConfig

    folder = tmp_path / "gsm8k"
    write_parquet(folder / "train.parquet", [verl_row(0, "train")])
    write_parquet(folder / "test.parquet", [verl_row(0, "test")])
    cfg = load_config(GRPOThinkConfig, [f"data.path={folder}", f"output_dir={tmp_path / 'out'}"])
    assert (cfg.data.path, cfg.eval.path) == (str(folder / "train.parquet"), str(folder / "test.parquet"))
    save_config(cfg, tmp_path / "out")  # config.yaml shows both, and re-runs the same
    again = load_config(GRPOThinkConfig, ["--config", str(tmp_path / "out" / "config.yaml")])
    assert (again.data.path, again.eval.path) == (cfg.data.path, cfg.eval.path)

    other = load_config(GRPOThinkConfig, [f"data.path={folder}", f"eval.path={tmp_path}/mine.jsonl"])
    assert other.data.path == str(folder / "train.parquet") and other.eval.path == f"{tmp_path}/mine.jsonl"
    none = load_config(GRPOThinkConfig, [f"data.path={folder}", "eval.rows=0"])
    assert none.data.path == str(folder / "train.parquet") and none.eval.path == ""


def test_grpo_cli_holds_out_the_test_split_and_names_its_bad_row(tiny_home, tmp_path):
    folder = tmp_path / "gsm8k"
    write_parquet(folder / "train.parquet", [verl_row(i, "train") for i in range(3)])
    write_parquet(folder / "test.parquet", [verl_row(0, "test"), verl_row(1, "test", answer=None)])
    out = tmp_path / "out"
    proc = cli("grpo_think.py", f"model.path={tiny_home}", f"data.path={folder}", f"output_dir={out}",
               "data.prompts_per_step=2")
    line = error_line(proc)  # the test split is loaded as the evaluation set, before any actor starts
    assert line.startswith(f"error: bad row 'test-1' in {folder / 'test.parquet'}, row 2: missing answer: "), line
    assert "the row has columns: data_source, prompt, ability, reward_model, extra_info" in line
    assert f"data: training on {folder / 'train.parquet'}; its held-out split {folder / 'test.parquet'} is the " \
           "evaluation set" in proc.stderr
    saved = (out / "config.yaml").read_text()
    assert f"path: {folder / 'train.parquet'}" in saved and f"path: {folder / 'test.parquet'}" in saved


# ----------------------------------------------------------------------------- bytes that are not UTF-8


def test_non_utf8_bytes_are_one_bad_row(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "q", "answer": "1"},
                                              b'{"id": "b", "prompt": "caf\xe9", "answer": "2"}\n',
                                              {"id": "c", "prompt": "q", "answer": "3"}])
    with pytest.raises(BadRowError, match=r"^bad row in .*d\.jsonl, line 2: not UTF-8 text "
                                          r"\(byte 0xe9 at position 27 of the line\)"):
        load_dataset(DataConfig(path=str(path)))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.dataset"):
        data = load_dataset(DataConfig(path=str(path), on_bad_row="skip"))
    assert [r["id"] for r in data.rows] == ["a", "c"] and dict(data.report.by_reason) == {"unreadable": 1}
    assert "1 of 3 rows skipped (unreadable: 1)" in caplog.text
    write_jsonl(path, [b"\xef\xbb\xbf" + json.dumps({"id": "bom", "prompt": "q", "answer": "1"}).encode() + b"\n"])
    assert [r["id"] for r in read_rows(path)] == ["bom"]  # a UTF-8 byte-order mark is not a bad row


def test_grpo_cli_non_utf8_line_stops_or_is_skipped_and_counted(tiny_home, tmp_path):
    rows = [{"id": f"r{i}", "data_source": "math", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}
            for i in range(3)]
    data = write_jsonl(tmp_path / "train.jsonl", [rows[0], b'{"id": "x", "prompt": "\xff\xfe"}\n', *rows[1:]])
    args = [f"model.path={tiny_home}", f"data.path={data}", f"output_dir={tmp_path / 'out'}"]
    line = error_line(cli("grpo_think.py", *args, "data.prompts_per_step=2"))
    assert line == (f"error: bad row in {data}, line 2: not UTF-8 text (byte 0xff at position 24 of the line) "
                    "(set data.on_bad_row=skip to drop such rows)")

    # skipped and counted; the run then stops on purpose before Ray: 3 usable rows cannot fill a step of 4
    proc = cli("grpo_think.py", *args, "data.on_bad_row=skip", "data.prompts_per_step=4")
    assert error_line(proc) == "error: data.prompts_per_step=4 is more than the 3 usable rows"
    assert f"skipping bad row in {data}, line 2: not UTF-8 text" in proc.stderr
    assert "1 of 4 rows skipped (unreadable: 1)" in proc.stderr


# ----------------------------------------------------------------------------- TRL, EasyR1, OpenRLHF columns


def test_trl_conversational_rows_load_and_render(tmp_path, tiny_model):
    import transformers

    path = write_parquet(tmp_path / "trl.parquet", [trl_row(1, "6"), trl_row(2, "7")])
    rows = read_rows(path)
    assert [(r["id"], r["answer"], r["solution"]) for r in rows] == [("trl-1", "6", {"answer": "6"}),
                                                                    ("trl-2", "7", {"answer": "7"})]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    data = load_dataset(DataConfig(path=str(path)), tok)
    text = render_prompt(data.rows[0], "think", tok).text
    assert "What is 1 + 5?" in text and "Be brief." in text and "<answer></answer>" in text  # template + own system
    own = render_prompt(data.rows[0], "think", tok, DataConfig(template="row")).text
    assert "What is 1 + 5?" in own and "<answer>" not in own

    # beside an answer column, a string solution is the worked trace (MATH-style sets)
    row = read_rows(write_jsonl(tmp_path / "math.jsonl", [{"problem": "1 + 1?", "solution": "One and one: 2.",
                                                           "answer": "2"}]), prompt_key="problem")[0]
    assert row["prompt"] == "1 + 1?" and row["answer"] == "2"
    assert row["solution"] == {"think": "One and one: 2.", "answer": "2"}


def test_named_columns_and_the_missing_answer_error_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "rlhf.jsonl", [{"input": "2 + 2?", "label": "4"}, {"input": "3 + 3?", "label": "6"}])
    with pytest.raises(BadRowError) as err:
        load_dataset(DataConfig(path=str(path)))
    assert str(err.value).startswith(f"bad row 'rlhf-1' in {path}, line 1: no prompt column 'prompt' "
                                     "(data.prompt_key names another)")
    assert "the row has columns: input, label" in str(err.value)
    with pytest.raises(BadRowError) as err:
        load_dataset(DataConfig(path=str(path), prompt_key="input"))
    assert str(err.value) == (f"bad row 'rlhf-1' in {path}, line 1: missing answer: no value in answer, "
                              "reward_model.ground_truth, extra_info.answer or solution (data.answer_key names the "
                              "answer column); the row has columns: input, label (set data.on_bad_row=skip to drop "
                              "such rows)")
    data = load_dataset(DataConfig(path=str(path), prompt_key="input", answer_key="label"))
    assert [(r["prompt"], r["answer"]) for r in data.rows] == [("2 + 2?", "4"), ("3 + 3?", "6")]
    with pytest.raises(BadRowError, match=r"line 1: missing answer: no value in data.answer_key='lbl'; the row has "
                                          r"columns: input, label"):
        load_dataset(DataConfig(path=str(path), prompt_key="input", answer_key="lbl"))

    nested = write_jsonl(tmp_path / "nested.jsonl", [{"prompt": "q", "meta": {"gold": "9"}}])
    assert read_rows(nested, answer_key="meta.gold")[0]["answer"] == "9"


def test_sft_string_solution_is_an_answer_for_fast_and_a_named_bad_row_for_think(tiny_model, tmp_path):
    from home_rl.trainer.sft import SFTOptions, build_sequences
    from home_rl.trainer.startup import load_processor

    path = write_jsonl(tmp_path / "trl.jsonl", [trl_row(i, str(i + 5)) for i in range(3)])
    cfg = DataConfig(path=str(path))
    processor = load_processor(tiny_model("qwen2"))
    data = load_dataset(cfg, processor)
    fast = build_sequences(data.rows, processor, cfg, SFTOptions(route="fast"), False, data.origins)
    tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    assert tok.decode(fast["trl-2"][0].response_ids).startswith("<think></think><answer>6</answer>")
    with pytest.raises(BadRowError) as err:
        build_sequences(data.rows, processor, cfg, SFTOptions(route="think"), False, data.origins)
    assert str(err.value) == (f"bad row 'trl-1' in {path}, line 1: no worked trace (solution.think) for the think "
                              "template, only an answer; sft.route=fast trains on answers alone "
                              "(set data.on_bad_row=skip to drop such rows)")


def test_sft_cli_trains_on_the_train_split_and_names_a_row_without_a_trace(tiny_model, tmp_path):
    folder = tmp_path / "trl"
    write_jsonl(folder / "train.jsonl", [trl_row(i) for i in range(3)])
    write_jsonl(folder / "test.jsonl", [trl_row(i) for i in range(10, 12)])
    args = [f"model.path={tiny_model('qwen2')}", f"data.path={folder}", f"output_dir={tmp_path / 'out'}"]
    proc = cli("sft.py", *args, "sft.route=think", "data.prompts_per_step=2")
    assert error_line(proc).startswith(f"error: bad row 'train-1' in {folder / 'train.jsonl'}, line 1: no worked "
                                       "trace (solution.think) for the think template")
    assert f"data folder {folder} holds a train and a held-out split: reading train.jsonl only" in proc.stderr

    # the fast template trains on the string solutions; 3 train rows (not 5: test is held out) cannot fill a step of 4
    proc = cli("sft.py", *args, "sft.route=fast", "data.prompts_per_step=4")
    assert error_line(proc) == "error: data.prompts_per_step=4 is more than the 3 usable rows"


# ----------------------------------------------------------------------------- row names


def test_rows_are_named_by_file_and_1_based_line_or_row(tmp_path):
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "q", "answer": "1"}, b"\n", [1, 2],
                                              b'{"prompt": "Unterminated\n', {"prompt": "q", "answer": "2"},
                                              {"id": "a", "prompt": "q2", "answer": "3"}])
    data = load_dataset(DataConfig(path=str(path), on_bad_row="skip"))
    assert data.report.examples == [
        f"bad row in {path}, line 3: a row must be an object/record, got list",
        f"bad row in {path}, line 4: not valid JSON: Unterminated string starting at column 12",
        f"bad row 'a' in {path}, line 6: its id is used by an earlier row (line 1)",
    ]
    assert [r["id"] for r in data.rows] == ["a", "d-5"]  # default ids carry the line too
    assert data.origins["d-5"].where == "line 5" and data.origins["d-5"].file == str(path)

    pq = write_parquet(tmp_path / "p.parquet", [{"prompt": "q", "answer": "1"}, {"prompt": "", "answer": "2"}])
    with pytest.raises(BadRowError, match=rf"^bad row 'p-2' in {pq}, row 2: empty prompt"):
        load_dataset(DataConfig(path=str(pq)))

    datasets.Dataset.from_list([{"id": "h1", "prompt": "q", "answer": "1"},
                                {"id": "h2", "prompt": "q", "answer": None}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BadRowError, match=rf"^bad row 'h2' in {tmp_path / 'saved'}, row 2: missing answer"):
        load_dataset(DataConfig(path=str(tmp_path / "saved")))


# ----------------------------------------------------------------------------- GSM8K's `#### 72`

GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("response, ground_truth, score", [
    ("She sold 48 + 24 clips.\n#### 72", "72", 1.0),
    ("She sold 48 + 24 clips.\n#### 72", GSM8K_GOLD, 1.0),
    ("<think>48 + 24</think><answer>72</answer>", GSM8K_GOLD, 1.0),
    ("<think>x</think><answer>#### 72</answer>", "72", 1.0),
    ("first #### 70, then\n#### 72", "72", 1.0),  # the last #### line counts
    ("#### 70\nno, #### 72 dollars", "72", 1.0),
    ("#### $1,200", "1200", 1.0),
    ("#### -3.5", "x\n#### -3.5", 1.0),
    ("She sold 48 + 24 clips.\n#### 71", GSM8K_GOLD, 0.0),
    ("#### 72\nno: #### 71", "72", 0.0),
    ("She sold 72 clips.", GSM8K_GOLD, 0.0),  # no ####, no <answer>, no \boxed: no answer
])
def test_math_verifier_reads_gsm8k_answers(response, ground_truth, score):
    from reward.verifiers.math_equal import math_verifier

    assert math_verifier(response, ground_truth)["score"] == score


def test_gsm8k_answers_through_the_reward_pool(ray_local):
    from reward import RewardConfig, RewardPool, VerifierEntry

    cfg = RewardConfig(num_workers=1)
    cfg.sources = {"openai/gsm8k": [VerifierEntry("math")]}
    pool = RewardPool(cfg)
    try:
        samples = [{"id": i, "response": r, "ground_truth": GSM8K_GOLD, "data_source": "openai/gsm8k", "extra_info": {}}
                   for i, r in enumerate(["So 72 clips.\n#### 72", "#### 71", "<answer>72</answer>"])]
        results, _ = pool.score(samples)
    finally:
        pool.shutdown()
    assert [r["score"] for r in results] == [1.0, 0.0, 1.0]
