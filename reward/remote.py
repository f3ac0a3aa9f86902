"""Remote rewards: a chunk of samples POSTed as JSON to a reward server (`{url: http://HOST:PORT/PATH}` entries).

Request body (one POST per reward worker's chunk, Content-Type: application/json):

    {"samples": [{"id", "response", "ground_truth", "data_source", "extra_info", "prompt", "prompt_text",
                  "response_length"}, ...],
     "query": [prompt_text + response, ...], "prompts": [prompt_text, ...], "labels": [ground_truth, ...]}

`prompt` is the row's prompt (text or chat messages), `prompt_text` the prompt as the model saw it (chat
template applied). `query`, `prompts` and `labels` are what OpenRLHF sends to a `--remote_rm_url`, so its
reward servers answer unchanged. Response body: {"scores": [...]} or {"rewards": [...]}: one number per
sample, in order (OpenRLHF's {"rewards", "scores", "extra_logs": {name: [...]}} works: `rewards` is the
score, the rest is logged).

The whole exchange of a chunk has reward.timeout_s: a server that does not answer in time costs that
once per chunk and every sample of it counts as a timeout. Connection errors and HTTP 429/5xx are
retried with exponential backoff (0.2 s, 0.4 s, ...) until that time is spent; other errors are not.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

FIRST_BACKOFF_S = 0.2
RETRY_STATUS = {429, 500, 502, 503, 504}


def request_body(items: list[dict]) -> dict:
    samples = [{key: s[key] for key in ("id", "response", "ground_truth", "data_source", "extra_info", "prompt",
                                        "prompt_text", "response_length")} for s in items]
    return {"samples": samples, "query": [s["prompt_text"] + s["response"] for s in items],
            "prompts": [s["prompt_text"] for s in items], "labels": [s["ground_truth"] for s in items]}


def post(url: str, items: list[dict], timeout_s: float) -> Any:
    """The server's decoded JSON answer for `items`; TimeoutError when `timeout_s` runs out, else the last error."""
    data = json.dumps(request_body(items), default=str).encode()
    deadline = time.monotonic() + timeout_s
    backoff, attempts = FIRST_BACKOFF_S, 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"remote reward {url}: no answer within {timeout_s:g} s ({attempts} attempt(s))")
        attempts += 1
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=remaining) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS:
                detail = e.read()[:300].decode("utf-8", errors="replace")
                raise RuntimeError(f"remote reward {url}: HTTP {e.code} {e.reason}: {detail}") from None
            error: Exception = e
        except (TimeoutError, socket.timeout):
            raise TimeoutError(f"remote reward {url}: no answer within {timeout_s:g} s ({attempts} attempt(s))") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise TimeoutError(f"remote reward {url}: no answer within {timeout_s:g} s") from None
            error = e
        else:
            try:
                return json.loads(payload)
            except ValueError:
                raise RuntimeError(f"remote reward {url}: the answer is not JSON: {payload[:200]!r}") from None
        if time.monotonic() + backoff >= deadline:  # the next try would start past the limit
            raise ConnectionError(f"remote reward {url}: {_reason(error)} ({attempts} attempt(s) in {timeout_s:g} s)")
        time.sleep(backoff)
        backoff *= 2


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return f"{type(error).__name__}: {getattr(error, 'reason', None) or error}"
