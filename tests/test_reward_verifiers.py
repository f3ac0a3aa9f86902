"""The built-in verifiers, case by case (in-process), the registry, and the reward config."""
from __future__ import annotations

from pathlib import Path

import pytest

from home_rl.config import load_config
from home_rl.errors import ConfigError, HomeRLError
from reward import RewardConfig, get_verifier, known_verifiers, register_verifier, validate_sources
from reward.verifiers.extract import final_answer, last_boxed

FIXTURES = Path(__file__).parent / "fixtures_reward"
T = "<think>work</think>"  # a think block, for responses that need one


def ans(text: str) -> str:
    return f"{T}<answer>{text}</answer>"


# (verifier, response, ground truth, expected score, options / extra_info)
CASES = [
    # math: answers that must be judged equal
    ("math", ans(r"\frac{1}{2}"), "0.5", 1.0, {}),
    ("math", ans("0.5"), r"\frac{1}{2}", 1.0, {}),
    ("math", ans("x=3"), "3", 1.0, {}),
    ("math", ans("3"), "x=3", 1.0, {}),
    ("math", ans(r"50\%"), "0.5", 1.0, {"percent_as_fraction": True}),
    ("math", ans("0.5"), r"50\%", 1.0, {"percent_as_fraction": True}),
    ("math", ans("50%"), "0.5", 1.0, {"percent_as_fraction": True}),
    ("math", ans(r"25\%"), "25", 1.0, {}),
    ("math", ans(r"2\sqrt{2}"), r"\sqrt{8}", 1.0, {}),
    ("math", ans(r"\dfrac{3}{4}"), "0.75", 1.0, {}),
    ("math", ans(r"10 \text{ cm}"), "10", 1.0, {}),
    ("math", ans(r"90^\circ"), "90", 1.0, {}),
    ("math", ans("1,000"), "1000", 1.0, {}),
    ("math", ans("[1,2)"), "[1,2)", 1.0, {}),
    ("math", ans(r"\{3,2,1\}"), r"\{1,2,3\}", 1.0, {}),
    ("math", ans("(x+1)^2"), "x^2+2x+1", 1.0, {}),
    ("math", ans(r"\frac{\pi}{2}"), r"\pi/2", 1.0, {}),
    ("math", ans(r"\boxed{8}"), "8", 1.0, {}),
    ("math", r"so the result is \boxed{42}.", "42", 1.0, {}),
    ("math", r"first \boxed{41}, corrected: \boxed{42}", "42", 1.0, {}),
    (r"math", r"\boxed{7} but finally <answer>8</answer>", "8", 1.0, {}),
    ("math", ans("12"), 12, 1.0, {}),
    ("math", ans(r"\frac14"), 0.25, 1.0, {}),
    ("math", ans("0.5"), ["1/3", "1/2"], 1.0, {}),
    ("math", ans("7 apples"), "7", 1.0, {}),
    ("math", ans(r"\$5"), "5", 1.0, {}),
    ("math", ans(r"\infty"), r"\infty", 1.0, {}),
    ("math", ans("-2.50"), "-5/2", 1.0, {}),
    # math: answers that must not
    ("math", ans(r"50\%"), "0.5", 0.0, {}),  # a percentage reads as its number unless configured
    ("math", ans("0.49"), "0.5", 0.0, {}),
    ("math", ans("0.33"), r"\frac{1}{3}", 0.0, {}),
    ("math", ans("3.14"), r"\pi", 0.0, {}),
    ("math", ans("(1,2]"), "[1,2]", 0.0, {}),
    ("math", ans(r"\{1,2\}"), r"\{1,2,3\}", 0.0, {}),
    ("math", ans("-2"), "2", 0.0, {}),
    ("math", ans("x=4"), "3", 0.0, {}),
    ("math", r"first \boxed{42}, corrected: \boxed{41}", "42", 0.0, {}),
    ("math", "the answer is 8", "8", 0.0, {}),  # no <answer> block and no \boxed: no final answer
    ("math", ans(""), "8", 0.0, {}),
    ("math", ans("no idea"), "3", 0.0, {}),
    ("math", "", "1", 0.0, {}),
    ("math", None, "1", 0.0, {}),
    ("math", "<answer>8", "8", 0.0, {}),  # an unclosed block is no answer
    # vqa
    ("vqa", ans("Two"), "2", 1.0, {}),
    ("vqa", ans("ten"), 10, 1.0, {}),
    ("vqa", ans("the red circle"), "red circle", 1.0, {}),
    ("vqa", ans("Yes."), "yes", 1.0, {}),
    ("vqa", ans("A dog"), "dog", 1.0, {}),
    ("vqa", ans("1,000"), "1000", 1.0, {}),
    ("vqa", ans("3.5"), "3.5", 1.0, {}),
    ("vqa", ans("don't know"), "dont know", 1.0, {}),
    ("vqa", "<think></think><answer>Blue!</answer>", "blue", 1.0, {}),
    ("vqa", "blue", "blue", 1.0, {}),  # no template: the whole response is the answer
    ("vqa", ans("2"), ["2", "2", "2", "two", "3"], 1.0, {}),
    ("vqa", ans("red"), ["red", "red", "blue"], 2 / 3, {}),
    ("vqa", ans("red"), ["red", "blue", "green"], 1 / 3, {}),
    ("vqa", ans("green"), ["red", "blue"], 0.0, {}),
    ("vqa", ans("no"), "yes", 0.0, {}),
    ("vqa", ans("3.5"), "35", 0.0, {}),
    ("vqa", ans(""), "blue", 0.0, {}),
    ("vqa", ans("red square"), "red circle", 0.0, {}),
    # ocr
    ("ocr", ans("Hello  World"), "hello world", 1.0, {}),
    ("ocr", ans("Hello\nWorld"), "hello world", 1.0, {}),
    ("ocr", ans("K7P-42"), "K7P-42", 1.0, {}),
    ("ocr", ans(" Lima "), ["Lima", "Lima city"], 1.0, {}),
    ("ocr", ans("K7P-43"), "K7P-42", 0.0, {}),
    ("ocr", ans("K7P42"), "K7P-42", 0.0, {}),
    ("ocr", ans(""), "x", 0.0, {}),
    ("ocr", ans("K7P-43"), "K7P-42", 5 / 6, {"anls": True}),
    ("ocr", ans("hello worlds"), "hello world", 1 - 1 / 12, {"anls": True}),
    ("ocr", ans("abcd"), "abxy", 0.5, {"anls": True}),
    ("ocr", ans("xyz"), "K7P-42", 0.0, {"anls": True}),
    ("ocr", ans("K7P-42"), "K7P-42", 1.0, {"anls": True}),
    ("ocr", ans("abcd"), "abxy", 0.0, {"anls": True, "anls_threshold": 0.6}),
    # format (expert from extra_info; think by default)
    ("format", "<think>reason</think><answer>5</answer>", None, 1.0, {"extra_info": {"expert": "think"}}),
    ("format", "<think>reason</think><answer>5</answer>", None, 1.0, {}),
    ("format", "  <think>\nreason\n</think>\n<answer>5</answer>\n", None, 1.0, {}),
    ("format", "<think></think><answer>5</answer>", None, 1.0, {"extra_info": {"expert": "fast"}}),
    ("format", "<think>  </think><answer>5</answer>", None, 1.0, {"extra_info": {"expert": "fast"}}),
    ("format", "<think></think><answer>5</answer>", None, 0.0, {"extra_info": {"expert": "think"}}),
    ("format", "<think>reason</think><answer>5</answer>", None, 0.0, {"extra_info": {"expert": "fast"}}),
    ("format", "<think>reason</think>", None, 0.0, {}),
    ("format", "<think>reason</think><answer> </answer>", None, 0.0, {}),
    ("format", "hi <think>reason</think><answer>5</answer>", None, 0.0, {}),
    ("format", "<think>reason</think><answer>5</answer> and more", None, 0.0, {}),
    ("format", "<think>reason</think><answer>5</answer><answer>6</answer>", None, 0.0, {}),
    ("format", "<answer>5</answer><think>reason</think>", None, 0.0, {}),
    ("format", "<think>reason</think> so <answer>5</answer>", None, 0.0, {}),
    ("format", "5", None, 0.0, {}),
    # choice
    ("choice", ans("B"), "B", 1.0, {}),
    ("choice", ans("(C)"), "C", 1.0, {}),
    ("choice", ans("B. Paris"), "B", 1.0, {}),
    ("choice", ans("b"), "B", 1.0, {}),
    ("choice", ans(r"\text{B}"), "B", 1.0, {}),
    ("choice", ans("A"), "(A)", 1.0, {}),
    ("choice", "The answer is (D).", "D", 1.0, {}),
    ("choice", r"Therefore \boxed{A}", "A", 1.0, {}),
    ("choice", "I compared them. Answer: C", "C", 1.0, {}),
    ("choice", ans("Paris"), "B", 1.0, {"extra_info": {"choices": ["London", "Paris", "Rome"]}}),
    ("choice", ans("C"), ["A", "C"], 1.0, {}),
    ("choice", ans("C"), "B", 0.0, {}),
    ("choice", ans("maybe"), "A", 0.0, {}),
    ("choice", ans("Berlin"), "B", 0.0, {"extra_info": {"choices": ["London", "Paris"]}}),
    ("choice", "", "A", 0.0, {}),
]


def test_enough_cases():
    assert len(CASES) >= 80
    assert {c[0] for c in CASES} == {"math", "vqa", "ocr", "format", "choice"}


@pytest.mark.parametrize("name,response,truth,expected,kwargs", CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_verifier_case(name, response, truth, expected, kwargs):
    kwargs = dict(kwargs)
    extra_info = kwargs.pop("extra_info", {})
    result = get_verifier(name)(response, truth, data_source="test", extra_info=extra_info, **kwargs)
    score = result["score"] if isinstance(result, dict) else result
    assert score == pytest.approx(expected), f"{name}: {response!r} vs {truth!r} -> {result}"


def test_format_rejects_unknown_expert():
    with pytest.raises(ValueError, match="expert"):
        get_verifier("format")(ans("1"), None, data_source="x", extra_info={"expert": "slow"})


def test_answer_extraction():
    assert final_answer(r"<answer>\boxed{\frac{1}{2}}</answer>") == r"\frac{1}{2}"
    assert final_answer(r"x \boxed{\{1,2\}} y") == r"\{1,2\}"
    assert final_answer(r"\boxed 5") == "5"
    assert final_answer("nothing") is None
    assert last_boxed("\\boxed{" * 50_000) is None  # unbalanced and deep: no answer, no recursion
    assert last_boxed("\\boxed{" * 500 + "7" + "}" * 500) == "7"  # the innermost box is the last one


# ----------------------------------------------------------------------------- registry


def test_builtin_names_are_known():
    assert {"math", "vqa", "ocr", "format", "choice"} <= set(known_verifiers())


def test_decorator_registers():
    @register_verifier("test_reward_verifiers_len")
    def by_length(response, ground_truth, *, data_source, extra_info):
        return float(len(response) == ground_truth)

    assert get_verifier("test_reward_verifiers_len")("abc", 3, data_source="s", extra_info={}) == 1.0


def test_file_spec_loads_a_function(monkeypatch):
    fn = get_verifier(f"{FIXTURES / 'keyword_verifier.py'}:mentions_keyword")
    assert fn("The Cat sat", "cat", data_source="s", extra_info={}) == {"score": 1.0, "length": 11}
    monkeypatch.chdir(FIXTURES.parent.parent)  # relative to the working folder
    assert get_verifier("tests/fixtures_reward/keyword_verifier.py:mentions_keyword")("x", "y", data_source="s",
                                                                                     extra_info={})["score"] == 0.0


def test_module_spec_loads_a_function():
    fn = get_verifier("reward.verifiers.vqa_match:vqa_verifier")
    assert fn("two", "2", data_source="s", extra_info={})["score"] == 1.0


@pytest.mark.parametrize("spec,message", [
    ("no_such_verifier", "unknown verifier 'no_such_verifier'; known: choice, format, math"),
    ("missing/file.py:fn", "file not found"),
    (f"{FIXTURES / 'keyword_verifier.py'}:nope", "has no function 'nope'; it has: mentions_keyword"),
    ("reward.no_such_module:fn", "cannot import module"),
])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(HomeRLError, match=message.replace("(", r"\(")):
        get_verifier(spec)


# ----------------------------------------------------------------------------- config


def test_config_loads_with_overrides(tmp_path):
    yaml = tmp_path / "reward.yaml"
    yaml.write_text("num_workers: 3\nsources:\n  mine:\n    - {name: vqa, weight: 0.5}\n    - {name: format}\n")
    cfg = load_config(RewardConfig, ["--config", str(yaml), "timeout_s=2.5", "ocr_metric=anls",
                                     "sources.extra=[{name: ocr, weight: 2.0}]"])
    assert cfg.num_workers == 3 and cfg.timeout_s == 2.5
    assert [(e.name, e.weight) for e in cfg.sources["mine"]] == [("vqa", 0.5), ("format", 1.0)]
    assert cfg.sources["extra"][0].weight == 2.0
    assert "math" in cfg.sources  # defaults stay
    assert cfg.verifier_options("ocr") == {"anls": True, "anls_threshold": 0.5}


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="ocr_metric"):
        load_config(RewardConfig, ["ocr_metric=fuzzy"])
    with pytest.raises(ConfigError, match="weight"):
        load_config(RewardConfig, ["sources.mine=[{name: vqa, weight: lots}]"])


def test_unmapped_source_is_a_startup_error_listing_known_ones():
    cfg = RewardConfig()
    validate_sources(cfg, ["math", "vqa"])
    with pytest.raises(ConfigError) as err:
        validate_sources(cfg, ["math", "geometry", "charts"])
    message = str(err.value)
    assert "'charts', 'geometry'" in message
    assert "knows: arith, choice, extract, math, ocr, vqa" in message


def test_math_does_not_parse_huge_answers():
    result = get_verifier("math")(ans("{" * 100_000 + "}" * 100_000), "1", data_source="math", extra_info={})
    assert result == {"score": 0.0, "has_answer": True, "too_long": True}
