"""The OpenAI wire format: requests checked into typed objects, errors as OpenAI error bodies, and the
think trace split from the answer.

A request is checked field by field before anything runs: a bad value is an `APIError` (HTTP 4xx,
`{"error": {"message", "type", "param", "code"}}`) naming the field, as OpenAI's API answers. Fields
a standard client sends that the server has no use for (`user`, `logit_bias`, ...) are ignored.

Both experts answer in one template, `<think>…</think><answer>…</answer>` (the fast expert's think
is empty). `ResponseSplitter` turns the growing text into the answer (`message.content`) and the
trace (`message.reasoning_content`), the way vLLM's reasoning parsers do, and it does so
incrementally: the deltas it emits while streaming add up to what a non-streamed request returns.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from home_rl.experts import EXPERTS
from home_rl.router.operating_point import EFFORTS
from reward.verifiers.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN  # the verifiers' template

AUTO = "auto"
EXPERT_CHOICES = (AUTO, *EXPERTS)
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Sampling:
    """What a request asks of the sampler (the server's defaults where it names nothing)."""
    max_tokens: Optional[int] = None  # None: what the context leaves, at most engine.max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop: list[str] = dataclasses.field(default_factory=list)  # added to the server's stop strings
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None


@dataclasses.dataclass
class GenerationRequest:
    """A checked /v1/chat/completions or /v1/completions request."""
    kind: str  # chat | completion
    model: str
    expert: str  # auto | think | fast
    sampling: Sampling
    reasoning_effort: Optional[str] = None  # OpenAI's low | medium | high: moves the router's threshold (None: the checkpoint's)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    messages: list[dict] = dataclasses.field(default_factory=list)  # chat: string contents, images as <image> markers
    images: list[Any] = dataclasses.field(default_factory=list)  # chat: image bytes or file paths, in marker order
    prompt: Optional[str] = None  # completion: the prompt text (sent as it is, no chat template)
    prompt_token_ids: Optional[list[int]] = None  # completion: the prompt as token ids

    @property
    def prompt_param(self) -> str:
        """The body field that holds the prompt, as errors about it name it."""
        return "messages" if self.kind == "chat" else "prompt"


MAX_JSON_DEPTH = 64  # an OpenAI request nests about 6 deep (messages[].content[].image_url.url); deeper is abuse


def decode_body(raw: bytes) -> Any:
    """The JSON of a request body; APIError 400 for one that is not JSON or nests deeper than MAX_JSON_DEPTH
    (Python's parser recurses: a body of 100k '[' would be a RecursionError, and any later walk of a deep one)."""
    too_deep = APIError(400, f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # deeper than Python's recursion limit: the parser gave up
        raise too_deep from None
    if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def json_depth(value: Any, stop: int) -> int:
    """How deep `value` nests lists and dicts (a scalar: 0), counted without recursion up to stop + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        deepest = max(deepest, depth)
        if deepest > stop:
            break
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_request(body: Any, kind: str, image_dir: str = "") -> GenerationRequest:
    """Check a decoded JSON body; raises APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: a model id from /v1/models", "model")
    expert = body.get("expert", AUTO)
    if expert not in EXPERT_CHOICES:
        raise APIError(400, f"'expert' must be one of {', '.join(EXPERT_CHOICES)}, got {expert!r}", "expert")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise APIError(400, f"'reasoning_effort' must be one of {', '.join(EFFORTS)}, got {effort!r}", "reasoning_effort")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    request = GenerationRequest(kind=kind, model=model, expert=expert, sampling=_sampling(body), stream=stream,
                                include_usage=bool(options.get("include_usage", False)), reasoning_effort=effort)
    if kind == "chat":
        request.messages, request.images = _messages(body.get("messages"), image_dir)
    else:
        request.prompt, request.prompt_token_ids = _prompt(body.get("prompt"))
    return request


def _typed(body: dict, key: str, types: Any, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and types is not bool and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{key}' must be a number, got {value!r}", key)
    if not isinstance(value, types):
        want = {bool: "true or false", int: "an integer", str: "a string"}.get(types, "a number")
        raise APIError(400, f"'{key}' must be {want}, got {value!r}", key)
    return value


def _ranged(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = float(_typed(body, key, (int, float), default))
    if value < lo or value > hi or (lo_open and value == lo):
        raise APIError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return value


def _sampling(body: dict) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise APIError(400, f"'{key}' must be an integer of at least 1, got {max_tokens!r}", key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise APIError(400, f"'n' must be in [1, 16], got {n}", "n")
    top_k = _typed(body, "top_k", int, -1)
    if top_k == 0 or top_k < -1:
        raise APIError(400, f"'top_k' must be -1 (off) or at least 1, got {top_k}", "top_k")
    return Sampling(max_tokens=max_tokens, temperature=_ranged(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_ranged(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=top_k, n=n, stop=list(stop),
                    presence_penalty=_ranged(body, "presence_penalty", 0.0, -2.0, 2.0),
                    frequency_penalty=_ranged(body, "frequency_penalty", 0.0, -2.0, 2.0),
                    seed=_typed(body, "seed", int, None))


def _messages(messages: Any, image_dir: str) -> tuple[list[dict], list[Any]]:
    """Messages with string contents (image parts become <image> markers) and their images in order."""
    from data_pipelines.templates import IMAGE_MARKER

    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    out, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
        text = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind == "image_url":
                if message["role"] != "user":
                    raise APIError(400, f"{where}: images go in user messages", f"{where}.content[{k}]")
                images.append(image_ref(part.get("image_url"), f"{where}.content[{k}].image_url", image_dir))
                text.append(IMAGE_MARKER)
            else:
                raise APIError(400, f"{where}.content[{k}] must be a text or image_url part, got type {kind!r}",
                               f"{where}.content[{k}]")
        out.append({"role": message["role"], "content": "".join(text)})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's (the assistant answers it)", "messages")
    return out, images


def image_ref(value: Any, param: str, image_dir: str) -> bytes | str:
    """An image_url value as image bytes (a data URL) or a file path (file:// or plain, under `image_dir`)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param} needs a 'url': a data URL or a file path", param)
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, f"{param}: a data URL must be data:image/...;base64,<data>", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: the data URL's base64 does not decode: {e}", param) from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{param}: the server fetches no remote images; send the image as a data URL", param)
    path = Path(url.removeprefix("file://"))
    if not image_dir:
        raise APIError(400, f"{param}: file paths are refused unless the server is started with "
                            "image_dir=FOLDER; send the image as a data URL", param)
    root = Path(image_dir).resolve()
    resolved = path.resolve() if path.is_absolute() else (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise APIError(403, f"{param}: {url} is outside the server's image_dir", param, kind="permission_error")
    return str(resolved)


def _prompt(prompt: Any) -> tuple[Optional[str], Optional[list[int]]]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return None, list(prompt)
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


# ----------------------------------------------------------------------------- the answer and its trace


class ResponseSplitter:
    """Splits `<think>trace</think><answer>answer</answer>` as it grows into (trace, answer) deltas.

        splitter = ResponseSplitter()
        for text_delta in stream: reasoning, content = splitter.feed(text_delta)
        reasoning, content = splitter.finish()

    Output that does not open with <think> has no trace; its answer is what <answer> encloses, or the
    whole text when it does not open with <answer> either. Text after </answer> (a request that
    overrode the stop strings) belongs to neither. A tag split across deltas is held back until it
    is whole, so the deltas never show part of a tag.
    """

    def __init__(self):
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = split_response(self.text, final)
        out = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = max(self.sent_reasoning, len(reasoning)), max(self.sent_content,
                                                                                                len(content))
        return out

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)


def split_response(text: str, final: bool = True) -> tuple[str, str]:
    """(trace, answer) of a whole response (final) or of one still growing (a partial tag held back)."""
    held = lambda s, tag: s if final else s[:len(s) - _partial_suffix(s, tag)]  # noqa: E731
    body = text.lstrip()
    if THINK_OPEN.startswith(body) and not final:
        return "", ""  # "<thi": not yet known whether a trace opens
    if body.startswith(THINK_OPEN):
        inner = body[len(THINK_OPEN):]
        close = inner.find(THINK_CLOSE)
        if close < 0:
            return held(inner, THINK_CLOSE), ""
        reasoning, rest = inner[:close], inner[close + len(THINK_CLOSE):]
    else:
        reasoning, rest = "", text
    return reasoning, _answer(rest, final, held)


def _answer(rest: str, final: bool, held) -> str:
    stripped = rest.lstrip()
    if not final and stripped and ANSWER_OPEN.startswith(stripped):
        return ""  # "<ans": not yet known whether the answer is tagged
    if not stripped.startswith(ANSWER_OPEN):
        return rest if final or stripped else ""
    inner = stripped[len(ANSWER_OPEN):]
    close = inner.find(ANSWER_CLOSE)
    return inner[:close] if close >= 0 else held(inner, ANSWER_CLOSE)


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest end of `s` that starts `tag` (a tag that may be arriving)."""
    for k in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:k]):
            return k
    return 0
