"""The HTTP side of `portfolio serve`: OpenAI-style endpoints (FastAPI), request routing to
versions, traceability, the request log, metrics and the safety limits.

Every answer names the exact version that produced it (``X-Portfolio-Version: NAME@7`` and
``portfolio.version`` in the body). Aliases and routes are resolved in memory and the caches
are dropped whenever the registry's serving change counter moves (`registry.changes`, read on
every request), so a promotion, a rollback or an archive reaches the next request, without a
restart, and requests in flight finish on the version they started with. An archived version is
never served.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from portfolio import web_guard
from portfolio.errors import InvalidState, NotFound, PortfolioError
from portfolio.server.engine import Completion, Engine
from portfolio.server.engine import Request as EngineRequest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerSettings:
    """Limits and choices of one server."""

    router: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_concurrency: int = 64
    poll_s: float = 0.0  # how stale routing may be; 0: the change counter is read on every request (one cheap query)
    flush_s: float = 2.0
    request_timeout_s: float = 300.0
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beside loopback ones when there is no key


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI-style error type and message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


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


@dataclass(frozen=True)
class Target:
    """What a request resolved to."""

    version: Any  # AdapterVersion, or None for the base
    label: str  # NAME@7 or base:NAME
    router: str | None
    rule: str | None


class Resolver:
    """``model`` + routing attributes -> the version to serve, from in-memory caches that are
    dropped when the registry's alias, route or status history changes."""

    def __init__(self, registry, base, settings: ServerSettings):
        self.registry, self.base, self.settings = registry, base, settings
        self.lock = threading.Lock()
        self.versions: dict[str, Any] = {}
        self.rules: dict[str, list] = {}
        self.marker = registry.serving_marker()
        self.checked = time.monotonic()

    def refresh(self) -> None:
        """Drop the caches if anything that decides routing changed since the last look."""
        if time.monotonic() - self.checked < self.settings.poll_s:
            return
        marker = self.registry.serving_marker()
        with self.lock:
            self.checked = time.monotonic()
            if marker != self.marker:
                self.marker, self.versions, self.rules = marker, {}, {}

    def _version(self, ref: str):
        with self.lock:
            if ref in self.versions:
                return self.versions[ref]
        version = self.registry.get_version(ref)
        with self.lock:
            self.versions[ref] = version
        return version

    def _rules(self, router: str) -> list | None:
        with self.lock:
            if router in self.rules:
                return self.rules[router]
        try:
            rules, _ = self.registry.route_rules(router)
        except NotFound:
            rules = None
        with self.lock:
            self.rules[router] = rules
        return rules

    def resolve(self, model: str | None, attributes: dict[str, str | None]) -> Target:
        """The version a request gets (ApiError when none can be served)."""
        from portfolio.routing import InvalidRoute, check_request, match

        self.refresh()
        name = model or self.settings.router
        if not name:
            raise ApiError(400, "no model given and the server has no --router: name a version, an alias, base:NAME or a router")
        if name == f"base:{self.base.name}":
            return Target(None, name, None, None)
        if name.startswith("base:"):
            raise ApiError(404, f"this server serves base {self.base.name}, not {name[5:]}", "not_found_error")
        rules = self._rules(name) if "@" not in name else None
        router = rule = None
        ref = name
        if rules is not None:
            try:
                request = check_request(attributes)
            except InvalidRoute as exc:
                raise ApiError(400, str(exc)) from None
            chosen = match(rules, request)
            if chosen is None:
                raise ApiError(404, f"router {name} has no rule for this request and no default", "not_found_error")
            router, rule, ref = name, chosen.label, chosen.to
        try:
            version = self._version(ref)
        except PortfolioError as exc:
            raise ApiError(404, str(exc), "not_found_error") from None
        if version.status == "archived":
            raise ApiError(409, f"{version.ref} is archived and is never served; point the alias or route at a served version",
                           "conflict_error")
        if version.base_model != self.base.name:
            raise ApiError(400, f"{version.ref} is built on base {version.base_model}; this server serves {self.base.name}")
        return Target(version, version.ref, router, rule)


class Stats:
    """Counters for /metrics and the request log (flushed to the registry)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (version, status) -> n
        self.tokens: Counter = Counter()  # kind -> n
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.pending: dict[tuple[str, str, str, datetime], list[int]] = {}

    def served(self, target: Target, completion: Completion, seconds: float) -> None:
        hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        with self.lock:
            self.requests[(target.label, "200")] += 1
            self.tokens["prompt"] += completion.prompt_tokens
            self.tokens["completion"] += len(completion.token_ids)
            self._observe(seconds)
            if target.version is not None:
                entry = self.pending.setdefault((target.label, target.router or "", target.rule or "direct", hour), [0, 0])
                entry[0] += 1
                entry[1] += completion.prompt_tokens + len(completion.token_ids)

    def failed(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[("-", str(status))] += 1
            self._observe(seconds)

    def _observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency[i] += 1
                return
        self.latency[-1] += 1

    def take_pending(self) -> dict:
        with self.lock:
            out, self.pending = self.pending, {}
        return {k: (v[0], v[1]) for k, v in out.items()}

    def prometheus(self, loaded: int) -> str:
        """The Prometheus text format."""
        with self.lock:
            lines = ["# HELP portfolio_requests_total Requests answered, by version and HTTP status.",
                     "# TYPE portfolio_requests_total counter"]
            lines += [f'portfolio_requests_total{{version="{v}",status="{s}"}} {n}' for (v, s), n in sorted(self.requests.items())]
            lines += ["# HELP portfolio_tokens_total Tokens processed.", "# TYPE portfolio_tokens_total counter"]
            lines += [f'portfolio_tokens_total{{kind="{k}"}} {n}' for k, n in sorted(self.tokens.items())]
            lines += ["# HELP portfolio_request_seconds Time to answer a request.", "# TYPE portfolio_request_seconds histogram"]
            total = 0
            for bound, n in zip(LATENCY_BUCKETS, self.latency):
                total += n
                lines.append(f'portfolio_request_seconds_bucket{{le="{bound}"}} {total}')
            total += self.latency[-1]
            lines += [f'portfolio_request_seconds_bucket{{le="+Inf"}} {total}', f"portfolio_request_seconds_sum {self.latency_sum:.6f}",
                      f"portfolio_request_seconds_count {total}"]
            errors = sum(n for (_, s), n in self.requests.items() if s != "200")
            lines += ["# HELP portfolio_errors_total Requests refused or failed.", "# TYPE portfolio_errors_total counter",
                      f"portfolio_errors_total {errors}",
                      "# HELP portfolio_loaded_adapters Adapter versions in memory.", "# TYPE portfolio_loaded_adapters gauge",
                      f"portfolio_loaded_adapters {loaded}"]
        return "\n".join(lines) + "\n"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _guard(app: FastAPI, settings: ServerSettings, stats: Stats) -> None:
    """What every request passes before a handler: the Host rule and the key
    (`web_guard`), then, on the API, the body's size (counted as it arrives) and JSON shape."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()

        def refuse(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
            stats.failed(status, time.perf_counter() - started)
            return _error(status, message, kind)

        if not web_guard.host_allowed(request.headers.get("host"), settings.api_key is not None, settings.allowed_hosts):
            return refuse(421, web_guard.host_refusal(request.headers.get("host")), "misdirected_request_error")
        # with a key, everything but the liveness probe needs it (the schema and /docs included)
        if settings.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return refuse(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error")
        if request.url.path.startswith("/v1/") or request.url.path == "/metrics":
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                return refuse(413, f"request body over {settings.max_body_bytes:,} bytes")
            if request.method == "POST":
                body = await web_guard.read_limited(request, settings.max_body_bytes)
                if body is None:  # the rest is never read: the connection closes after the answer
                    response = refuse(413, f"request body over {settings.max_body_bytes:,} bytes")
                    response.headers["Connection"] = "close"
                    return response
                # checked here, not left to FastAPI: some undecodable bodies (raw bytes) get its own
                # error shape instead of the OpenAI one (tests/test_server.py's property test), and a
                # deeply nested one would exhaust the parser's recursion
                problem = web_guard.parse_json_body(body)
                if problem:
                    return refuse(400, problem)
        response = await call_next(request)
        if response.status_code >= 400 and request.url.path.startswith("/v1/"):
            stats.failed(response.status_code, time.perf_counter() - started)
        return response


def create_app(registry, engine: Engine, settings: ServerSettings, log=print) -> FastAPI:
    """The FastAPI application over one engine."""
    resolver = Resolver(registry, engine.base, settings)
    stats = Stats()
    slots = threading.BoundedSemaphore(settings.max_concurrency)
    stop = threading.Event()

    def flush() -> None:
        pending = stats.take_pending()
        if pending:
            try:
                registry.record_requests(pending)
            except Exception as exc:  # the log must never take the server down; try again next time
                log(f"request log not written ({exc}); retrying")
                with stats.lock:
                    for key, (n, t) in pending.items():
                        entry = stats.pending.setdefault(key, [0, 0])
                        entry[0] += n
                        entry[1] += t

    def flusher() -> None:
        while not stop.wait(settings.flush_s):
            flush()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        thread = threading.Thread(target=flusher, name="portfolio-request-log", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(timeout=10)
        flush()
        engine.close()

    app = FastAPI(title="portfolio", version="1", lifespan=lifespan,
                  description="OpenAI-compatible serving of a portfolio's adapter versions, routed by tenant, task and risk.")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(ApiError)
    async def refused(_request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception):
        log(f"error: {type(exc).__name__}: {exc}")
        return _error(500, "internal error; see the server's log", "server_error")

    _guard(app, settings, stats)

    def attributes(request: Request, body: Attributes) -> dict[str, str | None]:
        return {key: getattr(body, key) or request.headers.get(f"x-portfolio-{key}") for key in ("tenant", "task", "risk")}

    def run(target: Target, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int) -> Completion:
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty: there is nothing to complete")
        if max_tokens > settings.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens}")
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens, over this server's limit of {settings.max_prompt_tokens}")
        if not slots.acquire(blocking=False):
            raise ApiError(429, f"the server is at its limit of {settings.max_concurrency} requests in flight; retry shortly",
                           "rate_limit_error")
        try:
            future = engine.submit(EngineRequest(target.version, prompt_ids, max_tokens, temperature, seed))
            try:
                return future.result(timeout=settings.request_timeout_s)
            except InvalidState as exc:  # archived since it was resolved: its bytes are gone
                raise ApiError(409, str(exc), "conflict_error") from None
            except PortfolioError as exc:  # e.g. a damaged blob: this request fails, the server goes on
                raise ApiError(503, str(exc), "server_error") from None
        finally:
            slots.release()

    def headers(target: Target) -> dict[str, str]:
        out = {"X-Portfolio-Version": target.label}
        if target.router:
            out["X-Portfolio-Router"] = target.router
            out["X-Portfolio-Rule"] = target.rule or ""
        return out

    def trace(target: Target) -> dict[str, Any]:
        return {"version": target.label, "router": target.router, "rule": target.rule}

    def usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids), "total_tokens": c.prompt_tokens + len(c.token_ids)}

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: the base is loaded and the engine is running."""
        return {"status": "ok", "base": engine.base.name, "loaded_adapters": len(engine.loaded)}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Counters in the Prometheus text format."""
        return stats.prometheus(len(engine.loaded))

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        """Every version that can be asked for by name, every alias and router, and the base."""
        data = [{"id": f"base:{engine.base.name}", "object": "model", "owned_by": "portfolio"}]
        for v in registry.list_versions():
            if v.base_model != engine.base.name or v.status == "archived":
                continue
            data.append({"id": v.ref, "object": "model", "owned_by": "portfolio", "status": v.status})
            data += [{"id": f"{v.adapter}@{a}", "object": "model", "owned_by": "portfolio", "version": v.ref} for a in v.aliases]
        data += [{"id": name, "object": "model", "owned_by": "portfolio", "router": True} for name, *_ in registry.list_routers()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    def completions(body: CompletionBody, request: Request):
        """Complete a prompt with the version the model name (or router) resolves to."""
        started = time.perf_counter()
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request (got {len(body.prompt)})")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        target = resolver.resolve(body.model, attributes(request, body))
        c = run(target, engine.encode_text(prompt), body.max_tokens, body.temperature, body.seed)
        stats.served(target, c, time.perf_counter() - started)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            def events():
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": target.label,
                            "choices": [{"index": 0, "text": c.text, "finish_reason": None}], "portfolio": trace(target)})
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": target.label,
                            "choices": [{"index": 0, "text": "", "finish_reason": c.finish_reason}], "usage": usage(c)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers(target))
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": target.label,
                             "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
                             "usage": usage(c), "portfolio": trace(target)}, headers=headers(target))

    @app.post("/v1/chat/completions")
    def chat(body: ChatBody, request: Request):
        """Answer a conversation with the version the model name (or router) resolves to."""
        started = time.perf_counter()
        target = resolver.resolve(body.model, attributes(request, body))
        max_tokens = body.max_completion_tokens or body.max_tokens or 64
        c = run(target, engine.encode_chat([m.model_dump() for m in body.messages]), max_tokens, body.temperature, body.seed)
        stats.served(target, c, time.perf_counter() - started)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            def events():
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": target.label}
                yield _sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}], "portfolio": trace(target)})
                for piece in _pieces(engine, c.token_ids):
                    yield _sse(base | {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                yield _sse(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": c.finish_reason}], "usage": usage(c)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers(target))
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": target.label,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}],
                             "usage": usage(c), "portfolio": trace(target)}, headers=headers(target))

    app.state.flush = flush
    app.state.stats = stats
    return app


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _pieces(engine: Engine, token_ids: list[int]) -> list[str]:
    """The completion as incremental text pieces, one per token (decoded by prefix, so that
    multi-token characters come out whole)."""
    out, previous = [], ""
    for i in range(1, len(token_ids) + 1):
        text = engine.tokenizer.decode(token_ids[:i], skip_special_tokens=True)
        if text.startswith(previous) and len(text) > len(previous):
            out.append(text[len(previous):])
            previous = text
    return out
