"""Serving the hybrid model: recipes/serve.py on the tiny Qwen2.5-VL whose router the router stage trained.

The server runs as its own process (two real vLLM engines, a real HTTP server on 127.0.0.1) and is
talked to with the real `openai` client; its router's choices are checked against the choices
recipes/evaluate.py made on the same prompts (conftest's `stage_run`). The Ray Serve backend:
tests/test_serve_ray.py.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from home_rl.config import load_config, save_config
from home_rl.errors import ConfigError
from home_rl.serve.config import API_KEY_NOT_SAVED, ServeConfig, is_loopback
from home_rl.serve.protocol import (MAX_JSON_DEPTH, APIError, ResponseSplitter, decode_body, image_ref, parse_request,
                                    split_response)

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ["engine.dtype=float32", "engine.kv_cache_gib=0.25", "engine.max_model_len=512", "engine.max_tokens=16"]
API_KEY = "test-key-7f3a"  # the local server's (given as HOME_RL_API_KEY)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ----------------------------------------------------------------------------- the wire format, no engines


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>add them</think><answer>5</answer>", "add them", "5"),
    ("<think></think><answer>5</answer>", "", "5"),  # the fast expert's template
    ("  <think>a</think>\n<answer>b", "a", "b"),  # cut by max_tokens inside the answer
    ("<think>still thinking", "still thinking", ""),  # cut inside the trace
    ("The answer is 5", "", "The answer is 5"),  # no template: all answer
    ("<answer>7</answer>", "", "7"),
    ("<think>t</think>plain words", "t", "plain words"),
])
def test_split_response_and_its_stream_agree(text, reasoning, content):
    assert split_response(text) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(20):  # any cut into deltas adds up to the same split
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
        splitter, got = ResponseSplitter(), ["", ""]
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            r, c = splitter.feed(text[a:b], final=b == len(text))
            got[0] += r
            got[1] += c
        assert tuple(got) == (reasoning, content)  # so no delta showed a piece of a tag that later closed


def test_requests_are_checked_field_by_field(tmp_path):
    ok = {"model": "home", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(ok, "chat").expert == "auto"
    cases = {
        "expert": {**ok, "expert": "slow"},
        "temperature": {**ok, "temperature": "hot"},
        "top_p": {**ok, "top_p": 0},
        "max_tokens": {**ok, "max_tokens": 0},
        "n": {**ok, "n": 100},
        "stop": {**ok, "stop": [1]},
        "messages": {"model": "home", "messages": []},
        "messages[0].role": {"model": "home", "messages": [{"role": "robot", "content": "x"}]},
        "messages[0].content[0]": {"model": "home", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "model": {"messages": ok["messages"]},
    }
    for param, body in cases.items():
        with pytest.raises(APIError) as e:
            parse_request(body, "chat")
        assert e.value.status == 400 and e.value.param == param, (param, e.value.message)
    with pytest.raises(APIError, match="prompt"):
        parse_request({"model": "home", "prompt": ["a", "b"]}, "completion")

    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG")
    assert image_ref({"url": "data:image/png;base64," + base64.b64encode(b"xyz").decode()}, "p", "") == b"xyz"
    assert image_ref({"url": f"file://{png}"}, "p", str(tmp_path)) == str(png)
    for url, status in ((f"file://{png}", 400),  # no image_dir: file paths refused
                        ("http://example.com/a.png", 400), ("data:image/png;base64,@@@", 400)):
        with pytest.raises(APIError) as e:
            image_ref({"url": url}, "p", "")
        assert e.value.status == status
    with pytest.raises(APIError) as e:
        image_ref({"url": "/etc/passwd"}, "p", str(tmp_path))
    assert e.value.status == 403


def test_bodies_too_deep_are_a_400():
    assert decode_body(b'{"a": [[1]]}') == {"a": [[1]]}
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert decode_body(deep.encode()) is not None
    for body in (b"[" + deep.encode() + b"]", b"[" * 100_000, b'{"a":' * 50_000):  # parsed, and past the parser's limit
        with pytest.raises(APIError, match=f"deeper than {MAX_JSON_DEPTH} levels") as e:
            decode_body(body)
        assert e.value.status == 400
    with pytest.raises(APIError, match="not valid JSON"):
        decode_body(b"{not json")


def test_a_server_beyond_loopback_needs_a_key_that_config_yaml_does_not_keep(tmp_path, monkeypatch):
    monkeypatch.delenv("HOME_RL_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^host=0.0.0.0 serves other machines: set api_key=KEY .*"
                                          r"allow_unauthenticated=true"):
        load_config(ServeConfig, ["host=0.0.0.0"])
    assert load_config(ServeConfig, ["host=0.0.0.0", "allow_unauthenticated=true"]).api_key == ""
    cfg = load_config(ServeConfig, ["host=0.0.0.0", "api_key=secret-1"])
    saved = save_config(cfg.saved(), tmp_path)
    assert "secret-1" not in saved.read_text() and cfg.saved().api_key == API_KEY_NOT_SAVED
    with pytest.raises(ConfigError, match="^api_key: config.yaml does not keep"):  # not a server without its key
        load_config(ServeConfig, ["--config", str(saved)])
    monkeypatch.setenv("HOME_RL_API_KEY", "secret-2")
    again = load_config(ServeConfig, ["--config", str(saved)])
    assert again.api_key == "" and again.client_key() == "secret-2"
    assert load_config(ServeConfig, ["host=0.0.0.0"]).client_key() == "secret-2"
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "localhost", "::1")))
    assert not any(map(is_loopback, ("0.0.0.0", "", "10.1.2.3", "::", "example.com")))


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_rows(stage_run) -> list[dict]:
    """The evaluation's rows (their images as files) with the expert the evaluation's router chose for each."""
    data = stage_run["eval"] / "data" / "data.jsonl"
    rows = {r["id"]: r for r in map(json.loads, data.read_text().splitlines())}
    samples = [json.loads(line) for line in (stage_run["eval"] / "samples.jsonl").read_text().splitlines()]
    out = []
    for s in samples:
        row = dict(rows[s["id"]])
        row["images"] = [str((data.parent / p).resolve()) for p in row.get("images") or []]
        row["hybrid"] = s["choices"]["hybrid"]
        out.append(row)
    return out


def chat_messages(row: dict, as_files: bool = False) -> list[dict]:
    """The row's prompt as OpenAI chat messages, its images as image_url parts where its <image> markers are
    (before the text without markers), as data URLs or file paths."""
    from data_pipelines.templates import IMAGE_MARKER, as_messages

    def url(path: str) -> str:
        if as_files:
            return f"file://{path}"
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()

    images = iter(row.get("images") or [])
    out = []
    for m in as_messages(row["prompt"]):
        text = m["content"]
        if m["role"] == "user" and row.get("images") and IMAGE_MARKER not in text and not out:
            text = IMAGE_MARKER * len(row["images"]) + text
        parts = []
        for k, piece in enumerate(text.split(IMAGE_MARKER)):
            if k:
                parts.append({"type": "image_url", "image_url": {"url": url(next(images))}})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts if len(parts) != 1 or parts[0]["type"] != "text" else text})
    return out


def with_context(checkpoint: Path, context: int, out: Path) -> Path:
    """A copy of `checkpoint` whose config.json gives it `context` positions (max_position_embeddings; the rope
    weights do not depend on it), the same model otherwise."""
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())

    def patch(node):
        if isinstance(node, dict):
            for key, value in node.items():
                node[key] = context if key == "max_position_embeddings" else patch(value)
        return node

    (out / "config.json").write_text(json.dumps(patch(config)))
    return out


@pytest.fixture(scope="module")
def server(stage_run, tmp_path_factory):
    """recipes/serve.py as a process, on the trained checkpoint made a 512-position model and with no length key
    given (engine.max_model_len fits itself to the model), its key in HOME_RL_API_KEY; at the end it gets SIGTERM
    and must leave no process behind."""
    import psutil

    out = tmp_path_factory.mktemp("serve")
    checkpoint = with_context(stage_run["final"], 512, out / "checkpoint_512")
    port = free_port()
    engine = [arg for arg in ENGINE if not arg.startswith("engine.max_model_len=")]
    cmd = [sys.executable, str(ROOT / "recipes" / "serve.py"), f"checkpoint={checkpoint}", f"port={port}",
           f"output_dir={out}", f"image_dir={stage_run['eval'] / 'data'}", "log_every_s=1", *engine]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HOME_RL_CONSOLE": "quiet", "HOME_RL_API_KEY": API_KEY})
    deadline = time.monotonic() + 420
    while not (out / "server.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start (rc {proc.poll()}):\n{proc.stdout.read()}")
        time.sleep(1)
    info = json.loads((out / "server.json").read_text())
    assert info["url"] == f"http://127.0.0.1:{port}/v1" and info["pid"] == proc.pid
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("EngineCore" in c.name() for c in children), [c.name() for c in children]
    yield {"url": info["url"], "out": out, "proc": proc}

    proc.send_signal(signal.SIGTERM)
    console = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, console
    time.sleep(2)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {alive}"
    assert not (out / "server.json").exists()
    # the console is for people: start-up phases, the URL, summaries, and no library chatter
    assert "serving 'home' on" in console and "engines: 2 vLLM engines ready" in console
    assert "serve: " in console  # the periodic summary line
    assert "INFO" not in console and "vllm" not in console.lower().replace("vllm engines", ""), console


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key=API_KEY, max_retries=0, timeout=120)


def test_router_choices_equal_the_evaluations(client, stage_run):
    rows = eval_rows(stage_run)
    assert {r["hybrid"] for r in rows} == {"think", "fast"}  # a router whose choices say something
    for row in rows:
        reply = client.chat.completions.create(model="home", messages=chat_messages(row), max_tokens=4,
                                               temperature=0)
        home = reply.model_extra["home"]
        assert home["expert"] == row["hybrid"], (row["id"], row["data_source"], home)
        assert home["chosen_by"] == "router" and 0 <= home["think_probability"] <= 1
        assert (home["think_probability"] > home["threshold"]) == (home["expert"] == "think")
        assert reply.usage.completion_tokens <= 4 and reply.choices[0].finish_reason in ("stop", "length")


def test_reasoning_effort_moves_the_threshold(client, stage_run):
    """OpenAI's reasoning_effort on the same 64 prompts: thinking ratios that do not fall from low to high, high
    thinks on every prompt, and no effort is the checkpoint's calibrated point (medium)."""
    point = json.loads((stage_run["final"] / "config.json").read_text())["home"]["router_operating_point"]
    rng = random.Random(0)
    prompts = [f"What is {rng.randint(1, 99)} {rng.choice('+-*')} {rng.randint(1, 99)}?" for _ in range(64)]
    ratios = {}
    for effort in (None, "low", "medium", "high"):
        extra = {} if effort is None else {"reasoning_effort": effort}
        homes = [client.chat.completions.create(model="home", messages=[{"role": "user", "content": p}], max_tokens=1,
                                                temperature=0, extra_body=extra).model_extra["home"] for p in prompts]
        assert {h["reasoning_effort"] for h in homes} == {effort}
        assert {h["threshold"] for h in homes} == {point["efforts"][effort or "medium"]}
        assert all((h["think_probability"] > h["threshold"]) == (h["expert"] == "think") for h in homes)
        ratios[effort] = sum(h["expert"] == "think" for h in homes) / len(homes)
    assert ratios["low"] <= ratios["medium"] == ratios[None] <= ratios["high"] == 1.0, ratios


def test_streaming_adds_up_to_the_whole_answer(client, stage_run):
    row = eval_rows(stage_run)[0]
    ask = dict(model="home", messages=chat_messages(row), max_tokens=12, temperature=0, extra_body={"expert": "think"})
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    message = whole.choices[0].message
    assert content == (message.content or "") and reasoning == (message.model_extra.get("reasoning_content") or "")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.model_extra["home"]["expert"] == "think" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_forced_expert_skips_the_router(client, server):
    import httpx

    for expert in ("think", "fast"):
        reply = client.chat.completions.create(model="home", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                               max_tokens=3, extra_body={"expert": expert})
        assert reply.model_extra["home"] == {"expert": expert, "think_probability": None, "threshold": None,
                                             "reasoning_effort": None, "chosen_by": "request"}
    text = client.completions.create(model="home", prompt="2 + 3 =", max_tokens=3)
    assert text.model_extra["home"]["chosen_by"] == "router" and text.usage.completion_tokens <= 3
    assert [m.id for m in client.models.list().data] == ["home"]
    assert httpx.get(server["url"].removesuffix("/v1") + "/health").json() == {"status": "ok"}
    scrape = httpx.get(server["url"].removesuffix("/v1") + "/metrics").text
    for expert in ("think", "fast"):
        assert f'home_requests_total{{chosen_by="request",expert="{expert}"}} ' in scrape
        assert f'home_completion_tokens_total{{expert="{expert}"}}' in scrape
    assert "home_thinking_ratio" in scrape and "home_request_latency_seconds_bucket" in scrape
    records = [json.loads(line) for line in (server["out"] / "requests.jsonl").read_text().splitlines()]
    assert {"expert", "forced", "think_probability", "prompt_tokens", "completion_tokens",
            "latency_s"} <= set(records[0])


def test_image_files_under_image_dir(client, stage_run):
    row = next(r for r in eval_rows(stage_run) if r.get("images"))
    reply = client.chat.completions.create(model="home", messages=chat_messages(row, as_files=True), max_tokens=2,
                                           temperature=0)
    assert reply.model_extra["home"]["expert"] == row["hybrid"]  # the same image as the data URL gave


def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, server, stage_run):
    import httpx
    import openai

    url = server["url"] + "/chat/completions"
    good = {"model": "home", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    not_png = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    image = {"type": "image_url", "image_url": {"url": not_png}}
    cases = [  # (body, status, param)
        (b"{not json", 400, None),
        ({**good, "model": "gpt-4"}, 404, "model"),
        ({**good, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
        ({**good, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]}, 400,
         "messages"),
        ({**good, "expert": "slow"}, 400, "expert"),
        ({**good, "max_tokens": 10_000}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body),
                       headers={"content-type": "application/json", **AUTH}, timeout=60)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and error["type"], error
    assert "context" in httpx.post(url, json=cases[2][0], headers=AUTH).json()["error"]["message"]
    assert "image" in httpx.post(url, json=cases[3][0], headers=AUTH).json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=good["messages"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="home", messages=good["messages"], extra_body={"expert": "both"})
    assert client.chat.completions.create(**good).choices[0].finish_reason in ("stop", "length")
    scrape = httpx.get(server["url"].removesuffix("/v1") + "/metrics").text
    assert 'home_request_errors_total{status="400"}' in scrape


def test_the_key_guards_every_v1_route_and_a_deep_body_is_a_400(client, server):
    import httpx
    import openai
    from openai import OpenAI

    url, ask = server["url"], {"model": "home", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    stranger = OpenAI(base_url=url, api_key="not-the-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        stranger.chat.completions.create(**ask)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    for method, path in (("POST", "/chat/completions"), ("POST", "/completions"), ("GET", "/models")):
        r = httpx.request(method, url + path, json={**ask, "prompt": "hi"} if method == "POST" else None, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # open, as vLLM's is

    # the model has 512 positions and no length key was given: the engines took its context
    assert client.models.list().data[0].model_extra["max_model_len"] == 512
    saved = (server["out"] / "config.yaml").read_text()
    assert "max_model_len: 512" in saved and API_KEY not in saved

    for body in (b'{"model": "home", "messages": ' + b"[" * 100_000,  # past Python's recursion limit
                 json.dumps({**ask, "metadata": json.loads("[" * 100 + "]" * 100)}).encode()):
        r = httpx.post(url + "/chat/completions", content=body, headers={"content-type": "application/json", **AUTH},
                       timeout=60)
        assert r.status_code == 400 and "deeper than" in r.json()["error"]["message"], r.text
    assert client.chat.completions.create(**ask).choices[0].finish_reason in ("stop", "length")
