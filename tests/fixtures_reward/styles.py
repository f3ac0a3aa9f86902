"""One reward function per calling style, written the way each framework's users write them (no `style` given:
home-rl reads it from the signature). Each checks that it got what its framework passes, and returns its
own constant, so a GRPO run's `reward/<source>/mean` says which function scored which source.

Every row of the test data has `extra_info.check` equal to its answer and a prompt ending in
"the answer is <answer>.": a function that gets another row's fields, or a field in the wrong form, raises.
"""
import asyncio

HOME, VERL, TRL, TRL_ASYNC, OPENRLHF, EASYR1 = 0.11, 0.22, 0.33, 0.44, 0.55, 0.66


def home_score(response, ground_truth, *, data_source, extra_info):
    """home: one sample; the row's answer, source and extra_info (with the answering expert)."""
    assert isinstance(response, str) and data_source == "home", (response, data_source)
    assert ground_truth == extra_info["check"] and extra_info["expert"] == "think", (ground_truth, extra_info)
    return HOME


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl: called with keywords, one sample, a dict result (`score` used, the rest logged)."""
    assert data_source == "verl" and isinstance(solution_str, str), (data_source, solution_str)
    assert ground_truth == extra_info["check"], (ground_truth, extra_info)
    return {"score": VERL, "checked": 1.0}


def trl_reward(prompts, completions, completion_ids, **kwargs):
    """TRL, conversational: prompts and completions are message lists; every data column comes as a keyword list."""
    n = len(completions)
    assert len(prompts) == len(completion_ids) == n, (len(prompts), len(completion_ids), n)
    for prompt, completion, truth, check, answer in zip(prompts, completions, kwargs["ground_truth"],
                                                         kwargs["check"], kwargs["answer"]):
        assert isinstance(prompt, list) and prompt[-1]["role"] == "user", prompt
        assert prompt[-1]["content"].endswith(f"the answer is {truth}."), (prompt, truth)
        assert completion == [{"role": "assistant", "content": completion[0]["content"]}], completion
        assert truth == check == answer, (truth, check, answer)
    assert set(kwargs["data_source"]) == {"trl"} and all(isinstance(ids, list) for ids in completion_ids)
    return [TRL] * n


async def trl_async_reward(completions, ground_truth, **kwargs):
    """TRL, async (an LLM judge would await a client here): gathered with the chunk's other async calls."""
    await asyncio.sleep(0.01)
    assert isinstance(ground_truth, list) and len(ground_truth) == len(completions), ground_truth
    return [TRL_ASYNC for _ in completions]


def reward_func(queries, prompts, labels):
    """OpenRLHF: queries are prompt + response, prompts the templated prompts, labels the answers."""
    assert len(queries) == len(prompts) == len(labels)
    for query, prompt, label in zip(queries, prompts, labels):
        assert query.startswith(prompt) and f"the answer is {label}." in prompt, (query, prompt, label)
    return {"rewards": [OPENRLHF] * len(queries), "scores": [1.0] * len(queries),
            "extra_logs": {"query_chars": [float(len(q)) for q in queries]}}


def compute_score_easyr1(reward_inputs):
    """EasyR1 (batch): dicts with response, response_length (tokens) and ground_truth; `overall` plus parts."""
    out = []
    for item in reward_inputs:
        assert set(item) == {"response", "response_length", "ground_truth"}, item
        assert isinstance(item["response"], str) and isinstance(item["response_length"], int), item
        out.append({"overall": EASYR1, "format": 1.0, "accuracy": 0.0})
    return out


_in_flight, _most = 0, 0  # calls of concurrent_a / concurrent_b running now, and the most at once since none ran


async def _overlapping(n: int) -> list[float]:
    global _in_flight, _most
    _in_flight += 1
    _most = max(_most, _in_flight)
    await asyncio.sleep(0.3)
    seen = _most
    _in_flight -= 1
    if not _in_flight:
        _most = 0
    return [float(seen)] * n


async def concurrent_a(prompts, completions, **kwargs):
    """How many of concurrent_a / concurrent_b run at once: 2 when the sandbox gathers them, 1 if it ran them in turn."""
    return await _overlapping(len(completions))


async def concurrent_b(prompts, completions, **kwargs):
    return await _overlapping(len(completions))


def ambiguous(queries, prompts, labels, completions=None):
    """Fits both OpenRLHF (queries, prompts, labels) and TRL (completions): needs `style`."""
    return [float(len(labels[0]))] * len(queries)


def compute_score_one(reward_input):
    """EasyR1, sequential (reward_type: sequential): one dict in, one dict out."""
    return {"overall": float(reward_input["response"] == reward_input["ground_truth"]), "format": 1.0}
