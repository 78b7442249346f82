"""The HTTP application of `portfolio serve` (FastAPI): the endpoints of `server.api`, the
state of `server.state` on ``app.state.server``, the guard every request passes (Host rule,
key, body size and shape) and errors in OpenAI's shape."""

from __future__ import annotations

import hmac
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from portfolio import web_guard
from portfolio.server.api import router
from portfolio.server.engine import Engine
from portfolio.server.state import ApiError, ServerSettings, ServerState, Stats

__all__ = ["ServerSettings", "create_app"]


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
    state = ServerState(registry, engine, settings, log)

    @asynccontextmanager
    async def lifespan(_app):
        thread = threading.Thread(target=state.flush_until_stopped, name="portfolio-request-log", daemon=True)
        thread.start()
        yield
        state.stop.set()
        thread.join(timeout=10)
        state.flush()
        engine.close()

    app = FastAPI(title="portfolio", version="1", lifespan=lifespan,
                  description="OpenAI-compatible serving of a portfolio's adapter versions, routed by tenant, task and risk.")
    app.state.server = state
    app.state.flush, app.state.stats = state.flush, state.stats
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(Exception, _failed)
    _guard(app, settings, state.stats)
    app.include_router(router)
    return app


async def _invalid(_request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")


async def _refused(_request: Request, exc: ApiError):
    return _error(exc.status, exc.message, exc.kind)


async def _failed(request: Request, exc: Exception):
    request.app.state.server.log(f"error: {type(exc).__name__}: {exc}")
    return _error(500, "internal error; see the server's log", "server_error")
