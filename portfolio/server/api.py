"""The OpenAI-style endpoints of `portfolio serve` as module-level handlers on one router;
each reads the server's state from ``request.app.state.server`` (`server.state`).

Every answer names the exact version that produced it (``X-Portfolio-Version: NAME@7`` and
``portfolio.version`` in the body)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from portfolio.server.engine import Completion, Engine
from portfolio.server.state import ApiError, ServerState, Target, TokenStream

router = APIRouter()


class Attributes(BaseModel):
    """Routing attributes; the ``X-Portfolio-Tenant``/``-Task``/``-Risk`` headers do the same."""

    tenant: str | None = Field(default=None, max_length=100)
    task: str | None = Field(default=None, max_length=100)
    risk: str | None = Field(default=None, max_length=100)


class CompletionBody(Attributes):
    """``POST /v1/completions`` (OpenAI's legacy completions; other OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(default=None, max_length=300, description="A version (NAME@7), an alias (NAME@production), base:NAME or a router")
    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one)")
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    stream: bool = False


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Attributes):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(default=None, max_length=300, description="A version (NAME@7), an alias (NAME@production), base:NAME or a router")
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    stream: bool = False


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _attributes(request: Request, body: Attributes) -> dict[str, str | None]:
    return {key: getattr(body, key) or request.headers.get(f"x-portfolio-{key}") for key in ("tenant", "task", "risk")}


def _headers(target: Target) -> dict[str, str]:
    out = {"X-Portfolio-Version": target.label}
    if target.router:
        out["X-Portfolio-Router"] = target.router
        out["X-Portfolio-Rule"] = target.rule or ""
    return out


def _trace(target: Target) -> dict[str, Any]:
    return {"version": target.label, "router": target.router, "rule": target.rule}


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids), "total_tokens": c.prompt_tokens + len(c.token_ids)}


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    """Liveness: the base is loaded and the engine is running."""
    engine = _state(request).engine
    return {"status": "ok", "base": engine.base.name, "loaded_adapters": len(engine.loaded)}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> str:
    """Counters in the Prometheus text format."""
    state = _state(request)
    return state.stats.prometheus(len(state.engine.loaded))


@router.get("/v1/models")
def models(request: Request) -> dict[str, Any]:
    """Every version that can be asked for by name, every alias and router, and the base."""
    state = _state(request)
    base = state.engine.base.name
    data = [{"id": f"base:{base}", "object": "model", "owned_by": "portfolio"}]
    for v in state.registry.list_versions():
        if v.base_model != base or v.status == "archived":
            continue
        data.append({"id": v.ref, "object": "model", "owned_by": "portfolio", "status": v.status})
        data += [{"id": f"{v.adapter}@{a}", "object": "model", "owned_by": "portfolio", "version": v.ref} for a in v.aliases]
    data += [{"id": name, "object": "model", "owned_by": "portfolio", "router": True} for name, *_ in state.registry.routes.list()]
    return {"object": "list", "data": data}


@router.post("/v1/completions")
def completions(body: CompletionBody, request: Request):
    """Complete a prompt with the version the model name (or router) resolves to."""
    state, started = _state(request), time.perf_counter()
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise ApiError(400, f"prompt: one prompt per request (got {len(body.prompt)})")
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    target = state.resolver.resolve(body.model, _attributes(request, body))
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    prompt_ids = state.engine.encode_text(prompt)
    if body.stream:
        stream = state.stream(target, prompt_ids, body.max_tokens, body.temperature, body.seed)
        base = {"id": rid, "object": "text_completion", "created": created, "model": target.label}

        def chunk(piece: str | None, c: Completion | None) -> dict[str, Any]:
            if c is None:
                return base | {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}
            return base | {"choices": [{"index": 0, "text": "", "finish_reason": c.finish_reason}], "usage": _usage(c)}

        return _streaming(state, target, stream, started, [base | {"choices": [{"index": 0, "text": "", "finish_reason": None}], "portfolio": _trace(target)}], chunk)
    c = state.run(target, prompt_ids, body.max_tokens, body.temperature, body.seed)
    state.stats.served(target, c, time.perf_counter() - started)
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": target.label,
                         "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
                         "usage": _usage(c), "portfolio": _trace(target)}, headers=_headers(target))


@router.post("/v1/chat/completions")
def chat(body: ChatBody, request: Request):
    """Answer a conversation with the version the model name (or router) resolves to."""
    state, started = _state(request), time.perf_counter()
    target = state.resolver.resolve(body.model, _attributes(request, body))
    max_tokens = body.max_completion_tokens or body.max_tokens or 64
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    prompt_ids = state.engine.encode_chat([m.model_dump() for m in body.messages])
    if body.stream:
        stream = state.stream(target, prompt_ids, max_tokens, body.temperature, body.seed)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": target.label}

        def chunk(piece: str | None, c: Completion | None) -> dict[str, Any]:
            if c is None:
                return base | {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            return base | {"choices": [{"index": 0, "delta": {}, "finish_reason": c.finish_reason}], "usage": _usage(c)}

        opening = base | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}], "portfolio": _trace(target)}
        return _streaming(state, target, stream, started, [opening], chunk)
    c = state.run(target, prompt_ids, max_tokens, body.temperature, body.seed)
    state.stats.served(target, c, time.perf_counter() - started)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": target.label,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}],
                         "usage": _usage(c), "portfolio": _trace(target)}, headers=_headers(target))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _streaming(state: ServerState, target: Target, stream: TokenStream, started: float, opening: list[dict[str, Any]],
               chunk) -> StreamingResponse:
    """Server-sent events: the opening chunks, one chunk per piece of text as its tokens are
    generated, the finishing chunk with usage, ``[DONE]``. A failure after the stream has
    started (there is no status left to send) is an ``error`` event before ``[DONE]``."""

    def events():
        for data in opening:
            yield _sse(data)
        try:
            for piece in _pieces(state.engine, stream.tokens()):
                yield _sse(chunk(piece, None))
            c = stream.completion()
        except ApiError as exc:
            state.stats.failed(exc.status, time.perf_counter() - started)
            yield _sse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})
        else:
            state.stats.served(target, c, time.perf_counter() - started)
            yield _sse(chunk(None, c))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(target))


def _pieces(engine: Engine, token_ids):
    """Incremental text pieces of a token stream, one per token that completes some text
    (decoded by prefix, so that a character spread over several tokens comes out whole)."""
    ids, previous = [], ""
    for token in token_ids:
        ids.append(token)
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        if text.startswith(previous) and len(text) > len(previous):
            yield text[len(previous):]
            previous = text
