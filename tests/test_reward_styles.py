"""Bring your own rewards: verl's shipped scorers, and one function per framework's calling style, work unchanged
through the real reward pool and a real GRPO step (no `style` given: it is read from each signature)."""
from __future__ import annotations

import pytest

from home_rl.model import upcycle
from home_rl.resources import Resources
from home_rl.trainer.grpo_think import train
from reward import RewardConfig, RewardPool, VerifierEntry
from reward_runs import FIXTURES, RewardServer, grpo_config, read_metrics, write_rows

STYLES = str(FIXTURES / "styles.py")
VERL = "verl.utils.reward_score"
REMOTE = 0.77


def sample(i, response, ground_truth, source, **extra_info):
    return {"id": i, "response": response, "ground_truth": ground_truth, "data_source": source,
            "extra_info": extra_info}


def test_verl_scorers_score_right_and_wrong_answers(ray_local):
    from verl.utils.reward_score import default_compute_score, gsm8k, math_batch, math_dapo, math_reward

    cfg = RewardConfig(num_workers=1, resources=Resources(cpus=0.5), sources={
        "openai/gsm8k": [VerifierEntry(f"{VERL}.gsm8k:compute_score")],
        "lighteval/MATH": [VerifierEntry(f"{VERL}.math_reward:compute_score")],
        "math_dapo": [VerifierEntry(f"{VERL}.math_dapo:compute_score")],
        "HuggingFaceH4/MATH-500": [VerifierEntry(f"{VERL}:default_compute_score")],  # dispatches on data_source
        "batched": [VerifierEntry(f"{VERL}.math_batch:compute_score_batched")],
    })
    samples = [
        sample("g+", "She pays 6 * 7 = 42 dollars.\n#### 42", "42", "openai/gsm8k"),
        sample("g-", "She pays 6 * 6 = 36 dollars.\n#### 36", "42", "openai/gsm8k"),
        sample("m+", "So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "lighteval/MATH"),
        sample("m-", "So $x = \\boxed{2}$.", "\\frac{1}{2}", "lighteval/MATH"),
        sample("d+", "6 times 7 is 42.\nAnswer: 42", "42", "math_dapo"),
        sample("d-", "6 times 6 is 36.\nAnswer: 36", "42", "math_dapo"),
        sample("h+", "The sum is \\boxed{10}.", "10", "HuggingFaceH4/MATH-500"),
        sample("h-", "The sum is \\boxed{11}.", "10", "HuggingFaceH4/MATH-500"),
        sample("b+", "\\boxed{3}", "3", "batched"),
        sample("b-", "\\boxed{4}", "3", "batched"),
    ]
    pool = RewardPool(cfg)
    try:
        results, metrics = pool.score(samples)
    finally:
        pool.shutdown()
    scores = {r["id"]: r["score"] for r in results}
    assert scores == {"g+": 1.0, "g-": 0.0, "m+": 1.0, "m-": 0.0, "d+": 1.0, "d-": -1.0, "h+": 1.0, "h-": 0.0,
                      "b+": 1.0, "b-": 0.0}
    assert metrics["reward/failures"] == 0
    # the same as verl's own functions called here
    assert [float(gsm8k.compute_score(s["response"], s["ground_truth"])) for s in samples[:2]] == [1.0, 0.0]
    assert [math_reward.compute_score(s["response"], s["ground_truth"]) for s in samples[2:4]] == [1.0, 0.0]
    assert [math_dapo.compute_score(s["response"], s["ground_truth"])["score"] for s in samples[4:6]] == [1.0, -1.0]
    assert [default_compute_score(s["data_source"], s["response"], s["ground_truth"]) for s in samples[6:8]] == [1.0, 0.0]
    assert math_batch.compute_score_batched(["batched"] * 2, [s["response"] for s in samples[8:]], ["3", "3"],
                                            [{}, {}]) == [1.0, 0.0]
    dapo = {r["id"]: r for r in results}["d+"]
    assert dapo["extra"]["compute_score"]["acc"] is True and dapo["extra"]["compute_score"]["pred"] == "42"
    assert metrics["reward/verifier/math_dapo/compute_score/acc"] == 0.5  # a dict result's other keys are logged


def test_async_functions_of_a_chunk_run_concurrently(ray_local):
    cfg = RewardConfig(num_workers=1, resources=Resources(cpus=0.5), sources={
        "judged": [VerifierEntry(f"{STYLES}:concurrent_a"), VerifierEntry(f"{STYLES}:concurrent_b")]})
    pool = RewardPool(cfg)
    try:
        results, _ = pool.score([sample(i, "x", "1", "judged") for i in range(3)])
    finally:
        pool.shutdown()
    # each saw the other in flight: the sandbox gathered them instead of awaiting one after the other
    assert [r["scores"] for r in results] == [{"concurrent_a": 2.0, "concurrent_b": 2.0}] * 3


def test_an_explicit_style_settles_a_signature_that_fits_two(ray_local):
    cfg = RewardConfig(num_workers=1, resources=Resources(cpus=0.5), sources={
        "rm": [VerifierEntry(f"{STYLES}:ambiguous", style="openrlhf")],
        "seq": [VerifierEntry(f"{STYLES}:compute_score_one")]})  # EasyR1's one-at-a-time form, by its parameter
    pool = RewardPool(cfg)
    try:
        results, _ = pool.score([sample(0, "yes", "abc", "rm"), sample(1, "no", "abc", "rm"),
                                 sample(2, "7", "7", "seq"), sample(3, "8", "7", "seq")])
    finally:
        pool.shutdown()
    assert [r["score"] for r in results] == [3.0, 3.0, 1.0, 0.0]  # rm: called as OpenRLHF calls it, labels third
    assert results[2]["extra"]["compute_score_one"] == {"format": 1.0}


# ----------------------------------------------------------------------------- one GRPO step, every style


SOURCES = {  # data source -> (verifiers, the reward/<source>/mean they give)
    "home": ([VerifierEntry(f"{STYLES}:home_score")], 0.11),
    "verl": ([VerifierEntry(f"{STYLES}:compute_score")], 0.22),
    "trl": ([VerifierEntry(f"{STYLES}:trl_reward"), VerifierEntry(f"{STYLES}:trl_async_reward")], 0.33 + 0.44),
    "openrlhf": ([VerifierEntry(f"{STYLES}:reward_func")], 0.55),
    "easyr1": ([VerifierEntry(f"{STYLES}:compute_score_easyr1")], 0.66),
}


def style_rows() -> list[dict]:
    rows = []
    for i, source in enumerate([*SOURCES, "remote"]):
        answer = str(i + 2)
        question = f"Row {i}: say {answer}; the answer is {answer}."
        prompt = [{"role": "user", "content": question}] if source == "trl" else question  # TRL: conversational
        rows.append({"id": f"{source}-0", "data_source": source, "prompt": prompt, "answer": answer,
                     "extra_info": {"check": answer}})
    return rows


@pytest.fixture(scope="module")
def styles_run(tiny_model, ray_local, tmp_path_factory):
    """One GRPO step over six sources: five scored by one style each, one by a remote reward server."""
    root = tmp_path_factory.mktemp("styles")
    home = upcycle(tiny_model("qwen2")).save_pretrained(root / "home")
    data = write_rows(root / "data.jsonl", style_rows())
    with RewardServer(lambda path, body: (200, {"scores": [REMOTE] * len(body["samples"])})) as server:
        sources = {source: entries for source, (entries, _) in SOURCES.items()}
        sources["remote"] = [VerifierEntry(url=server.url("/score"))]
        train(grpo_config(home, root / "run", data, sources, steps=1, prompts_per_step=6))
    return read_metrics(root / "run"), server.requests


def test_every_style_scores_its_source_in_a_grpo_step(styles_run):
    metrics, _ = styles_run
    assert [m["step"] for m in metrics] == [1]
    step = metrics[0]
    for source, (_, want) in SOURCES.items():
        assert step[f"reward/{source}/mean"] == pytest.approx(want), source
    assert step["reward_pool/failures"] == 0
    # what the styles' results carry beyond the score is logged per source and verifier
    assert step["reward_pool/verifier/verl/compute_score/checked"] == 1.0
    assert step["reward_pool/verifier/openrlhf/reward_func/scores"] == 1.0
    assert step["reward_pool/verifier/openrlhf/reward_func/query_chars"] > 0
    assert step["reward_pool/verifier/easyr1/compute_score_easyr1/format"] == 1.0
    assert step["reward_pool/verifier/trl/trl_async_reward"] == pytest.approx(0.44)


def test_a_remote_reward_server_scores_the_run_samples(styles_run):
    metrics, requests = styles_run
    assert metrics[0]["reward/remote/mean"] == pytest.approx(REMOTE)
    probe, step = requests["/score"]  # the start-up probe on the source's row, then the step's 4 samples
    assert len(probe["samples"]) == 1 and len(step["samples"]) == 4
    for s, query, prompt, label in zip(step["samples"], step["query"], step["prompts"], step["labels"]):
        assert set(s) == {"id", "response", "ground_truth", "data_source", "extra_info", "prompt", "prompt_text",
                          "response_length"}
        assert s["data_source"] == "remote" and s["ground_truth"] == label == "7" and s["id"].startswith("remote-0#")
        assert s["prompt"] == "Row 5: say 7; the answer is 7." and prompt == s["prompt_text"]
        assert s["prompt"] in prompt and prompt != s["prompt"]  # the prompt as the model saw it: chat-templated
        assert query == prompt + s["response"] and 1 <= s["response_length"] <= 12
