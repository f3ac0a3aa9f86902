"""The reward pool end to end on real Ray: plug-in verifiers of all three kinds, hard time limits,
failures counted and logged, hostile inputs, and results in input order."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from home_rl.errors import ConfigError
from home_rl.resources import Resources
from reward import RewardConfig, RewardPool, VerifierEntry, get_verifier, register_verifier

FIXTURES = Path(__file__).parent / "fixtures_reward"
TIMEOUT_S = 1.5


@register_verifier("test_pool_parity")
def parity(response, ground_truth, *, data_source, extra_info):
    """Decorator-registered: is the answer's length even? (extra key `length` gets logged)"""
    return {"score": float(len(response) % 2 == 0), "length": len(response)}


@register_verifier("test_pool_batch_len", batched=True)
def batch_len(responses, ground_truths, *, data_sources, extra_infos):
    """Batch form: one call per chunk; scores whether each response has ground_truth characters."""
    return [float(len(r) == g) for r, g in zip(responses, ground_truths)]


@register_verifier("test_pool_sleeps")
def sleeps_forever(response, ground_truth, *, data_source, extra_info):
    time.sleep(10**9)


@register_verifier("test_pool_spins")
def spins_forever(response, ground_truth, *, data_source, extra_info):
    while True:
        pass


@register_verifier("test_pool_raises")
def raises(response, ground_truth, *, data_source, extra_info):
    if response == "fine":
        return 1.0
    raise RuntimeError(f"cannot judge {response!r}")


@register_verifier("test_pool_bad_return")
def bad_return(response, ground_truth, *, data_source, extra_info):
    return {"verdict": "yes"}  # no score


@register_verifier("test_pool_exits")
def exits(response, ground_truth, *, data_source, extra_info):
    import os
    os._exit(3)  # the sandbox process dies under the call


@pytest.fixture(scope="module")
def entry_point_dir(tmp_path_factory):
    """A tiny installed distribution publishing `shout` in the home_rl.verifiers group (a dist-info on sys.path)."""
    root = tmp_path_factory.mktemp("ep_site")
    (root / "shout_pkg").mkdir()
    (root / "shout_pkg" / "__init__.py").write_text(
        "def shout(response, ground_truth, *, data_source, extra_info):\n"
        "    text = response.strip()\n"
        "    return float(bool(text) and text == text.upper())\n")
    dist = root / "shout_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[home_rl.verifiers]\nshout = shout_pkg:shout\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def pool(ray_local, entry_point_dir):
    # max_failure_rate=1.0: these tests fail verifiers on purpose and must see every batch's results
    cfg = RewardConfig(num_workers=2, resources=Resources(cpus=0.5), timeout_s=TIMEOUT_S, max_failure_rate=1.0)
    cfg.sources.update({
        "file": [VerifierEntry(f"{FIXTURES / 'keyword_verifier.py'}:mentions_keyword")],
        "entry": [VerifierEntry("shout")],
        "decorated": [VerifierEntry("test_pool_parity")],
        "batched": [VerifierEntry("test_pool_batch_len", 2.0)],
        "sleeps": [VerifierEntry("test_pool_sleeps")],
        "spins": [VerifierEntry("test_pool_spins")],
        "raises": [VerifierEntry("test_pool_raises")],
        "partial": [VerifierEntry("math", 1.0), VerifierEntry("test_pool_raises", 0.5)],
        "bad_return": [VerifierEntry("test_pool_bad_return")],
        "exits": [VerifierEntry("test_pool_exits")],
    })
    p = RewardPool(cfg)
    yield p
    p.shutdown()


def sample(i, response, ground_truth=None, source="math", **extra_info):
    return {"id": i, "response": response, "ground_truth": ground_truth, "data_source": source,
            "extra_info": extra_info}


def test_builtins_through_the_pool_keep_order(pool):
    rows = [
        ("<think>a</think><answer>\\frac{1}{2}</answer>", "0.5", "math", {}),
        ("<think>a</think><answer>0.4</answer>", "0.5", "math", {}),
        ("<think></think><answer>Two</answer>", "2", "vqa", {"expert": "fast"}),
        ("<think></think><answer>K7P-42</answer>", "K7P-42", "extract", {"expert": "fast"}),
        ("<think>b</think><answer>(C)</answer>", "C", "choice", {}),
        ("<answer>x=3</answer>", "3", "math", {}),  # right answer, wrong format
    ]
    samples = [sample(f"s{i}-{j}", r, g, s, **e) for i in range(10) for j, (r, g, s, e) in enumerate(rows)]
    results, metrics = pool.score(samples)
    assert [r["id"] for r in results] == [s["id"] for s in samples]
    for s, r in zip(samples, results):  # the same as calling the verifiers here
        verifier = {"extract": "ocr"}.get(s["data_source"], s["data_source"])
        want = get_verifier(verifier)(s["response"], s["ground_truth"], data_source=s["data_source"],
                                      extra_info=s["extra_info"])["score"]
        fmt = get_verifier("format")(s["response"], None, data_source="", extra_info=s["extra_info"])["score"]
        assert (r["accuracy"], r["format"]) == (want, fmt)
        assert r["score"] == pytest.approx(want + 0.1 * fmt)
        assert "error" not in r
    assert [r["accuracy"] for r in results[:6]] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert results[5]["format"] == 0.0
    assert metrics["reward/accuracy"] == pytest.approx(5 / 6)
    assert metrics["reward/by_source/math/accuracy"] == pytest.approx(2 / 3)
    assert metrics["reward/failures"] == 0
    assert metrics["reward/verifier/math/math/has_answer"] == 1.0


def test_plugin_verifiers_of_every_kind(pool):
    samples = [
        sample("f1", "<answer>The cat</answer>", "cat", "file"),
        sample("f2", "<answer>A dog</answer>", "cat", "file"),
        sample("e1", "LOUD", None, "entry"),
        sample("e2", "quiet", None, "entry"),
        sample("d1", "ab", None, "decorated"),
        sample("d2", "abc", None, "decorated"),
        sample("b1", "four", 4, "batched"),
        sample("b2", "four", 5, "batched"),
        sample("b3", "sixsix", 6, "batched"),
    ]
    results, metrics = pool.score(samples)
    by_id = {r["id"]: r for r in results}
    assert [by_id[i]["score"] for i in ("f1", "f2", "e1", "e2", "d1", "d2")] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert by_id["f1"]["extra"]["mentions_keyword"] == {"length": len("<answer>The cat</answer>")}
    assert by_id["d2"]["scores"] == {"test_pool_parity": 0.0}
    assert [by_id[i]["score"] for i in ("b1", "b2", "b3")] == [2.0, 0.0, 2.0]  # weight 2
    assert metrics["reward/verifier/decorated/test_pool_parity/length"] == pytest.approx(2.5)
    assert metrics["reward/failures"] == 0


@pytest.mark.parametrize("source", ["sleeps", "spins"])
def test_a_hanging_verifier_scores_zero_within_its_limit(pool, source):
    start = time.perf_counter()
    results, metrics = pool.score([sample("hang", "x", None, source)])
    elapsed = time.perf_counter() - start
    assert elapsed < TIMEOUT_S + 1.0
    assert results[0]["score"] == 0.0
    assert results[0]["error"][f"test_pool_{source}"]["kind"] == "timeout"
    assert metrics[f"reward/failures/{source}/test_pool_{source}/timeout"] == 1
    # The run goes on: hangs among good samples cost their own limit only, the rest is scored.
    mixed = [sample(0, "<answer>2</answer>", "2"), sample(1, "x", None, source), sample(2, "<answer>3</answer>", "3"),
             sample(3, "y", None, source), sample(4, "<answer>4</answer>", "5")]
    results, metrics = pool.score(mixed)
    assert [r["accuracy"] for r in results] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert [("error" in r) for r in results] == [False, True, False, True, False]
    assert metrics[f"reward/failures/{source}/test_pool_{source}/timeout"] == 2


def test_exceptions_are_counted_and_the_first_is_logged(pool, caplog):
    caplog.set_level(logging.WARNING, logger="reward.pool")
    samples = [sample("ok", "fine", None, "raises"), sample("bad-1", "awful", None, "raises"),
               sample("bad-2", "worse", None, "raises"),
               sample("p", "<think>t</think><answer>7</answer>", "7", "partial")]
    results, metrics = pool.score(samples)
    assert [r["score"] for r in results[:3]] == [1.0, 0.0, 0.0]
    assert results[1]["error"]["test_pool_raises"]["kind"] == "exception"
    assert "RuntimeError: cannot judge 'awful'" in results[1]["error"]["test_pool_raises"]["message"]
    assert results[3]["score"] == 1.0 and results[3]["accuracy"] == 1.0  # math right, the raiser counts 0
    # counted per data source and verifier entry: the same function fails in two sources, under two keys
    assert metrics["reward/failures/raises/test_pool_raises/exception"] == 2
    assert metrics["reward/failures/partial/test_pool_raises/exception"] == 1
    assert metrics["reward/failures/raises/test_pool_raises/timeout"] == 0
    messages = [r.getMessage() for r in caplog.records]
    firsts = [m for m in messages if "first exception" in m]
    assert len(firsts) == 2  # the first failure of each (source, verifier, kind), whole
    assert any("id='bad-1'" in m and "cannot judge 'awful'" in m and "'raises'" in m for m in firsts)
    summaries = [m for m in messages if m.startswith("reward failures in this batch")]
    assert len(summaries) == 1
    assert "raises/test_pool_raises 2/3 (2 exception)" in summaries[0]
    assert "partial/test_pool_raises 1/1 (1 exception)" in summaries[0]
    caplog.clear()
    pool.score([sample("bad-3", "again", None, "raises")])
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "first exception" in m]  # already logged once
    assert [m for m in messages if m.startswith("reward failures in this batch")]  # but every batch says it failed
    assert pool.failure_totals[("raises", "test_pool_raises", "exception")] >= 3


def test_bad_results_and_dying_verifiers_are_failures(pool):
    results, metrics = pool.score([sample("r", "x", None, "bad_return"), sample("x", "x", None, "exits"),
                                   sample("after", "<answer>1</answer>", "1")])
    assert "not a number" in results[0]["error"]["test_pool_bad_return"]["message"]
    assert "process died" in results[1]["error"]["test_pool_exits"]["message"]
    assert results[2]["accuracy"] == 1.0
    assert metrics["reward/failures"] == 2


def test_hostile_inputs_do_not_crash_the_pool(pool):
    megabyte = "x" * 1_000_000
    hostile = [
        None,
        megabyte,
        f"<think>{megabyte}</think><answer>{megabyte}</answer>",
        b"\xff\xfe<answer>1</answer>\xc3\x28",  # invalid UTF-8 bytes
        b"<answer>\xff1</answer>".decode("utf-8", errors="surrogateescape"),  # lone surrogates
        "<answer>" + "{" * 100_000 + "}" * 100_000 + "</answer>",
        "\\boxed{" * 100_000,
        "<answer>\\frac{" * 20_000 + "</answer>",
        "<answer>" * 50_000,
    ]
    samples = [sample(f"{source}-{i}", response, "1", source)
               for source in ("math", "vqa", "ocr", "choice") for i, response in enumerate(hostile)]
    results, metrics = pool.score(samples)
    assert [r["id"] for r in results] == [s["id"] for s in samples]
    assert all(0.0 <= r["score"] <= 1.1 for r in results)
    for r in results:  # a failure is reported as one, never silently
        assert "error" not in r or r["score"] == r["scores"]["format"] * 0.1
    assert metrics["reward/failures"] == sum(len(r.get("error", {})) for r in results)
    results, _ = pool.score([sample("after", "<think>a</think><answer>1</answer>", "1")])
    assert results[0]["score"] == pytest.approx(1.1)


def test_startup_errors_name_the_problem(pool, ray_local):
    with pytest.raises(ConfigError, match="data_source 'geometry'; reward.sources knows: .*math"):
        pool.score([sample(0, "1", "1", "geometry")])
    cfg = RewardConfig(sources={"math": [VerifierEntry("no_such_verifier")]})
    with pytest.raises(ConfigError, match="reward.sources.math: unknown verifier 'no_such_verifier'"):
        RewardPool(cfg)
