"""The hybrid server: the router picks an expert per request, that expert's view answers, over an OpenAI API.

    server = HybridServer(cfg, processor, router, {"think": engine, "fast": engine})
    app = build_app(server)          # FastAPI: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics

A chat request is rendered as training rendered its prompts (`data_pipelines.render_prompt`: the
expert's system prompt, `prompt.template`, `prompt.few_shot`), once with the router's template for the
router's features, once with the chosen expert's for its engine. `"expert": "think" | "fast"` in the
body skips the router. The response says who answered in a top-level `home` object, and gives the
think trace as `message.reasoning_content` (and `reasoning`, vLLM's newer name) apart from the answer.

The engines are anything with `async generate(GenerationJob) -> AsyncIterator[GenerationDelta]`: a
ViewEngine in this process, or a Ray Serve handle to a replica of one (home_rl/serve/ray_serve.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Protocol

from fastapi import Depends, Request  # at module level: FastAPI resolves the routes' annotations in these globals

from home_rl.experts import EXPERTS
from home_rl.serve.config import ServeConfig
from home_rl.serve.engines import GenerationDelta, GenerationJob
from home_rl.serve.metrics import RequestRecord, ServeMetrics
from home_rl.serve.protocol import AUTO, APIError, GenerationRequest, ResponseSplitter, decode_body, parse_request
from home_rl.serve.router import PromptRouter, RouteDecision

log = logging.getLogger(__name__)


class ViewClient(Protocol):
    def generate(self, job: GenerationJob) -> AsyncIterator[GenerationDelta]: ...


@dataclasses.dataclass
class Prepared:
    """A request made ready for an engine: who answers and what it reads."""
    request: GenerationRequest
    id: str
    expert: str
    think_probability: Optional[float]
    threshold: Optional[float]  # the router's threshold for this request (None: the request chose its expert)
    job: GenerationJob
    prompt_tokens: int  # counted as the engine counts them (image tokens expanded)
    arrived: float

    def home(self) -> dict:
        return {"expert": self.expert, "think_probability": self.think_probability, "threshold": self.threshold,
                "reasoning_effort": self.request.reasoning_effort,
                "chosen_by": "request" if self.request.expert != AUTO else "router"}


class HybridServer:
    def __init__(self, cfg: ServeConfig, processor: Any, router: PromptRouter, engines: dict[str, ViewClient],
                 metrics: Optional[ServeMetrics] = None):
        from data_pipelines.render import tokenizer_of

        self.cfg, self.processor, self.router, self.engines = cfg, processor, router, engines
        self.tokenizer = tokenizer_of(processor)
        self.data_cfg = cfg.prompt.data_config()
        self.metrics = metrics or ServeMetrics(log_every_s=cfg.log_every_s)
        if not router.trained:
            log.warning("the router of %s was never trained by the router stage (recipes/train_router.py): "
                        "its choices say little", cfg.checkpoint)

    # ------------------------------------------------------------------ preparing a request

    async def prepare(self, body: Any, kind: str) -> Prepared:
        arrived = time.perf_counter()
        request = parse_request(body, kind, self.cfg.image_dir)
        if request.model != self.cfg.served_model_name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                                f"{self.cfg.served_model_name!r} (see /v1/models)", "model", "model_not_found")
        if request.expert == AUTO:
            reads = self.cfg.router.template
            prompt, router_item, prompt_tokens = await asyncio.to_thread(self._render, request, reads, True)
            decision = await self.router.route(router_item, request.reasoning_effort)
            if decision.expert != reads and request.kind == "chat":  # the answering expert's own rendering
                prompt, _, prompt_tokens = await asyncio.to_thread(self._render, request, decision.expert)
        else:  # forced: no router forward
            decision = RouteDecision(request.expert, None)
            prompt, _, prompt_tokens = await asyncio.to_thread(self._render, request, request.expert)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        max_tokens = self._max_tokens(request, prompt_tokens)
        job = GenerationJob(request_id, prompt, request.sampling, max_tokens)
        return Prepared(request, request_id, decision.expert, decision.think_probability, decision.threshold, job,
                        prompt_tokens, arrived)

    def _render(self, request: GenerationRequest, expert: str, for_router: bool = False) -> tuple[dict, dict, int]:
        """(the engine's input, the router's input, the prompt's length in tokens) rendered for `expert`;
        the router's input holds pixel tensors only `for_router`."""
        from data_pipelines import render_prompt
        from data_pipelines.images import ImageLoadError
        from data_pipelines.render import RenderError
        from home_rl.errors import ConfigError
        from home_rl.router.features import router_input

        if request.kind == "completion":
            ids = request.prompt_token_ids
            if ids is None:
                ids = self.tokenizer(request.prompt)["input_ids"]
            vocab = len(self.tokenizer)
            if bad := [t for t in ids if t >= vocab]:
                raise APIError(400, f"'prompt' holds token id {bad[0]}, beyond the vocabulary ({vocab})", "prompt")
            return {"prompt_token_ids": list(ids)}, {"input_ids": list(ids), "mm_token_type_ids": None,
                                                     "mm_inputs": {}}, len(ids)
        if request.images and not hasattr(self.processor, "image_processor"):
            raise APIError(400, f"messages: {len(request.images)} image(s), but this model reads text only", "messages")
        row = {"id": "request", "prompt": request.messages, "images": request.images}
        try:
            rendered = render_prompt(row, expert, self.processor, self.data_cfg, with_pixels=for_router)
        except ImageLoadError as e:
            raise APIError(400, f"messages: a bad image: {e}", "messages", "invalid_image") from None
        except (RenderError, ConfigError, ValueError) as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        return rendered.vllm_input, router_input(rendered), rendered.num_tokens

    def _max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        context = self.cfg.engine.max_model_len
        param = request.prompt_param
        if prompt_tokens >= context:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, and this model's context is {context} tokens "
                                "(engine.max_model_len): shorten the prompt", param, "context_length_exceeded")
        room = context - prompt_tokens
        asked = request.sampling.max_tokens
        if asked is not None and asked > room:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens and max_tokens asks for {asked}: more than the "
                                f"context of {context} tokens; ask for at most {room}", "max_tokens",
                           "context_length_exceeded")
        return asked if asked is not None else min(self.cfg.engine.max_tokens, room)

    # ------------------------------------------------------------------ generating

    async def deltas(self, p: Prepared) -> AsyncIterator[GenerationDelta]:
        """The engine's deltas, counted in the metrics whichever way the request ends."""
        from home_rl.vllm_names import VLLMValidationError

        self.metrics.started(p.expert)
        tokens, first, finishes = 0, None, {}
        try:
            async for delta in self.engines[p.expert].generate(p.job):
                for s in delta.samples:
                    tokens += s.tokens
                    if s.finish_reason:
                        finishes[s.index] = s.finish_reason
                if first is None and any(s.text for s in delta.samples):
                    first = time.perf_counter() - p.arrived
                yield delta
        except VLLMValidationError as e:  # counted where the error is answered
            self.metrics.abandoned(p.expert)
            param = p.request.prompt_param
            raise APIError(400, f"{param}: {e}", param) from None
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.failed(499, p.expert)  # the client went away: the engine aborted the request
            raise
        except Exception:
            self.metrics.failed(500, p.expert)
            raise
        self.metrics.finished(RequestRecord(
            id=p.id, endpoint=p.request.kind, expert=p.expert, forced=p.request.expert != AUTO,
            think_probability=p.think_probability, prompt_tokens=p.prompt_tokens, completion_tokens=tokens,
            latency_s=time.perf_counter() - p.arrived, first_token_s=first, stream=p.request.stream,
            finish_reasons=[finishes.get(i) for i in range(p.request.sampling.n)]))

    async def complete(self, p: Prepared) -> dict:
        """The whole response of a request that does not stream."""
        texts = [""] * p.request.sampling.n
        tokens = [0] * p.request.sampling.n
        finishes: list[Optional[str]] = [None] * p.request.sampling.n
        async for delta in self.deltas(p):
            for s in delta.samples:
                texts[s.index] += s.text
                tokens[s.index] += s.tokens
                finishes[s.index] = s.finish_reason or finishes[s.index]
        choices = []
        for i, text in enumerate(texts):
            if p.request.kind == "chat":
                choices.append({"index": i, "message": message(*ResponseSplitter().feed(text, final=True)),
                                "finish_reason": finishes[i], "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finishes[i], "logprobs": None})
        return {**self._head(p, "chat.completion" if p.request.kind == "chat" else "text_completion"),
                "choices": choices, "usage": usage(p.prompt_tokens, sum(tokens)), "home": p.home()}

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """Server-sent events: chunks as the engine steps, then `data: [DONE]`."""
        chat = p.request.kind == "chat"
        head = self._head(p, "chat.completion.chunk" if chat else "text_completion")
        n = p.request.sampling.n
        splitters = [ResponseSplitter() for _ in range(n)]
        generated = 0
        if chat:
            yield _event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None} for i in range(n)], "home": p.home()})
        try:
            async for delta in self.deltas(p):
                choices = []
                for s in delta.samples:
                    generated += s.tokens
                    if not chat:
                        choices.append({"index": s.index, "text": s.text, "finish_reason": s.finish_reason})
                        continue
                    reasoning, content = splitters[s.index].feed(s.text, final=bool(s.finish_reason))
                    choices.append({"index": s.index, "delta": delta_message(reasoning, content),
                                    "finish_reason": s.finish_reason})
                if choices:
                    yield _event({**head, "choices": choices, "home": p.home()})
        except APIError as e:
            self.metrics.failed(e.status)
            yield _event(e.body())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  the stream has begun: the error travels as an event
            log.exception("request %s failed while streaming", p.id)
            yield _event(APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error").body())
        else:
            if p.request.include_usage:
                yield _event({**head, "choices": [], "usage": usage(p.prompt_tokens, generated)})
        yield "data: [DONE]\n\n"

    def _head(self, p: Prepared, obj: str) -> dict:
        return {"id": p.id, "object": obj, "created": int(time.time()), "model": self.cfg.served_model_name}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "home-rl", "root": self.cfg.checkpoint,
                                            "max_model_len": self.cfg.engine.max_model_len,
                                            "experts": list(EXPERTS)}]}


def message(reasoning: str, content: str) -> dict:
    trace = reasoning or None
    return {"role": "assistant", "content": content or None, "reasoning_content": trace, "reasoning": trace}


def delta_message(reasoning: str, content: str) -> dict:
    out = {}
    if reasoning:
        out["reasoning_content"] = out["reasoning"] = reasoning
    if content:
        out["content"] = content
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ----------------------------------------------------------------------------- HTTP


def build_app(server: HybridServer) -> Any:
    """The FastAPI app over `server`: every error is an OpenAI error body, and the server keeps serving. With
    cfg.api_key, every /v1/* route asks for it (a 401 otherwise); /health and /metrics stay open, as vLLM's do."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def summaries():  # the log's summary line, while requests come
            while True:
                await asyncio.sleep(min(5.0, server.cfg.log_every_s))
                if line := server.metrics.summary_due():
                    log.info(line)

        task = asyncio.create_task(summaries()) if server.cfg.log_every_s else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(title="home-rl hybrid server", lifespan=lifespan)

    def error_response(e: APIError) -> JSONResponse:
        server.metrics.failed(e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    key = server.cfg.api_key.encode()

    async def authorized(request: Request) -> None:
        """What every /v1/* route depends on: with an api_key, `Authorization: Bearer KEY` or a 401."""
        if not key:
            return
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not sent.strip():
            raise APIError(401, "no API key: send it as the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(sent.strip().encode(), key):  # in constant time: no key guessed byte by byte
            raise APIError(401, "the API key is not valid", code="invalid_api_key")

    v1 = [Depends(authorized)]

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown paths, wrong methods
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       kind=kind))

    async def generation(request: Request, kind: str):
        try:
            prepared = await server.prepare(decode_body(await request.body()), kind)
            if prepared.request.stream:
                return StreamingResponse(server.stream(prepared), media_type="text/event-stream")
            return JSONResponse(await server.complete(prepared))
        except APIError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001  counted by the server; the client gets an OpenAI error body
            log.exception("a %s request failed", kind)
            error = APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
            return JSONResponse(error.body(), status_code=500)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(request: Request):
        return await generation(request, "chat")

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request):
        return await generation(request, "completion")

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app

