"""Remote rewards on a real HTTP server on 127.0.0.1: the documented body, OpenRLHF's reward-server answer,
retries with backoff, a hanging server bounded by the time limit per batch, a server down at start-up.
(A remote reward scoring a GRPO run's samples: tests/test_reward_styles.py.)"""
from __future__ import annotations

import socket
import time

import pytest

from home_rl.errors import ConfigError
from home_rl.resources import Resources
from reward import RewardConfig, RewardPool, VerifierEntry
from reward_runs import RewardServer

TIMEOUT_S = 2.0


def answer(path: str, body: dict) -> tuple[int, dict]:
    samples = body["samples"]
    if path == "/exact":  # a real scorer: 1 when the response is the answer
        return 200, {"scores": [float(s["response"].strip() == s["ground_truth"]) for s in samples]}
    if path == "/openrlhf":  # what an OpenRLHF reward server reads and answers
        rewards = [float(q.endswith(label)) for q, label in zip(body["query"], body["labels"])]
        return 200, {"rewards": rewards, "scores": rewards, "extra_logs": {"query_chars": [len(q) for q in body["query"]]}}
    if path == "/busy":  # overloaded twice, then fine
        return (503, {"error": "busy"}) if len(server_requests("/busy")) <= 2 else (200, {"scores": [0.5] * len(samples)})
    if path == "/hang":
        SERVER.release.wait(60)  # bounded: the server's close releases it
        return 200, {"scores": [1.0] * len(samples)}
    if path == "/short":
        return 200, {"scores": [1.0]}
    return 400, {"error": f"no route {path}"}


SERVER: RewardServer


def server_requests(path: str) -> list[dict]:
    return SERVER.requests.get(path, [])


@pytest.fixture(scope="module")
def server():
    global SERVER
    with RewardServer(answer, lifetime_s=600) as SERVER:
        yield SERVER


@pytest.fixture(scope="module")
def pool(server, ray_local):
    cfg = RewardConfig(num_workers=2, resources=Resources(cpus=0.5), timeout_s=TIMEOUT_S, max_failure_rate=1.0,
                       sources={path.strip("/"): [VerifierEntry(url=server.url(path))]
                                for path in ("/exact", "/openrlhf", "/busy", "/hang", "/short", "/missing")})
    p = RewardPool(cfg)
    yield p
    p.shutdown()


def sample(i, response, ground_truth, source, prompt="Say it."):
    return {"id": i, "response": response, "ground_truth": ground_truth, "data_source": source,
            "extra_info": {"k": i}, "prompt": prompt, "prompt_text": f"<user>{prompt}</user>", "response_ids": [7, 8]}


def test_a_remote_server_scores_batches_in_the_documented_body(pool, server):
    samples = [sample(i, str(i % 3), "1", "exact") for i in range(6)]
    results, metrics = pool.score(samples)
    assert [r["score"] for r in results] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    bodies = server_requests("/exact")
    assert len(bodies) == 2  # one POST per reward worker's chunk
    assert sorted(s["id"] for b in bodies for s in b["samples"]) == list(range(6))
    bodies.sort(key=lambda b: b["samples"][0]["id"])  # the two chunks arrive in either order
    first = bodies[0]["samples"][0]
    assert first == {"id": 0, "response": "0", "ground_truth": "1", "data_source": "exact", "extra_info": {"k": 0},
                     "prompt": "Say it.", "prompt_text": "<user>Say it.</user>", "response_length": 2}
    assert bodies[0]["query"][0] == "<user>Say it.</user>0" and bodies[0]["labels"][0] == "1"
    assert metrics["reward/failures"] == 0


def test_an_openrlhf_reward_server_answers_unchanged(pool):
    results, metrics = pool.score([sample(0, "... so 42", "42", "openrlhf"), sample(1, "41", "42", "openrlhf")])
    assert [r["score"] for r in results] == [1.0, 0.0]
    label = "remote@" + pool.cfg.sources["openrlhf"][0].url.split("/")[2]
    assert results[0]["extra"][label] == {"scores": 1.0, "query_chars": len("<user>Say it.</user>... so 42")}
    assert metrics[f"reward/verifier/openrlhf/{label}/scores"] == 0.5


def test_overloaded_servers_are_retried_with_backoff(pool):
    start = time.perf_counter()
    results, metrics = pool.score([sample(0, "x", "1", "busy")])
    assert results[0]["score"] == 0.5 and metrics["reward/failures"] == 0
    assert len(server_requests("/busy")) == 3 and time.perf_counter() - start >= 0.2 + 0.4  # two backoffs


def test_a_hanging_server_costs_the_time_limit_per_batch_and_is_counted(pool):
    start = time.perf_counter()
    results, metrics = pool.score([sample(i, "x", "1", "hang") for i in range(8)])
    elapsed = time.perf_counter() - start
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3.0  # two chunks of 4, in parallel: one limit, not one per sample
    assert all(r["error"] for r in results) and {next(iter(r["error"].values()))["kind"] for r in results} == {"timeout"}
    label = next(iter(results[0]["scores"]))
    assert metrics[f"reward/failures/hang/{label}/timeout"] == 8
    assert len(server_requests("/hang")) == 2  # a timed-out batch is not sent again


def test_bad_answers_are_failures_not_retried(pool):
    # two chunks: [short, short] gets one score for two samples; [missing] gets HTTP 400
    results, metrics = pool.score([sample(0, "x", "1", "short"), sample(1, "y", "1", "short"),
                                   sample(2, "z", "1", "missing")])
    messages = [next(iter(r["error"].values()))["message"] for r in results]
    assert messages[0] == messages[1] and "'scores' must be a list of 2 numbers, got 1 values" in messages[0]
    assert "HTTP 400" in messages[2] and "no route /missing" in messages[2]
    assert len(server_requests("/short")) == len(server_requests("/missing")) == 1
    assert metrics["reward/failures"] == 3


def test_a_server_down_at_start_up_fails_the_probe(ray_local):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    pool = RewardPool(RewardConfig(num_workers=1, resources=Resources(cpus=0.5), timeout_s=TIMEOUT_S,
                                   sources={"judged": [VerifierEntry(url=url)]}))
    try:
        with pytest.raises(ConfigError, match=rf"data_source 'judged': reward server {url} failed on row 'r0': "
                                              r"ConnectionError: .*Connection refused"):
            pool.check([{"id": "r0", "data_source": "judged", "prompt": "Say 1.", "answer": "1", "extra_info": {}}])
    finally:
        pool.shutdown()
