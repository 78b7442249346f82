"""The dashboard: FastAPI with the HTML pages of `ui.pages`, the same data as JSON under
``/api`` (`ui.api`), the shared state of `ui.state` on ``app.state.dashboard``, and the
guard every request passes. Every handler makes registry calls and formats; nothing here
decides anything.

Read-only unless started with an API key. Writes (promote, rollback, revoke) then need the key
(``Authorization: Bearer KEY`` or ``X-API-Key`` on ``/api``, the form's key field on pages)
and a reason, and go through the same library calls as the CLI, so they are recorded exactly
as `portfolio promote`, `portfolio rollback` and `portfolio data revoke` record them.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from portfolio import web_guard
from portfolio.errors import InvalidState, NotFound, PortfolioError
from portfolio.registry.refs import MAX_VERSION
from portfolio.registry.registry import Registry
from portfolio.ui import api, pages
from portfolio.ui.state import HERE, DashboardState, WriteRefused, dashboard


MAX_INT_PARAM = MAX_VERSION  # page numbers and depths too: nothing a page shows numbers beyond a version


def _out_of_range(request: Request) -> str | None:
    """The first integer in the path or query too large for any page, version or depth."""
    values = [("path", seg) for seg in request.url.path.split("/")] + list(request.query_params.multi_items())
    for name, value in values:
        text = value.strip().lstrip("+-")
        if text.isascii() and text.isdigit() and (len(text) > 12 or int(text) > MAX_INT_PARAM):
            return f"{name} {value[:30]}{'...' if len(value) > 30 else ''} is out of range (at most {MAX_INT_PARAM:,})"
    return None


def _refusal(request: Request, status: int, message: str) -> Response:
    """A refusal before any handler ran: JSON under /api, one plain line elsewhere."""
    if request.url.path.startswith("/api/"):
        response: Response = JSONResponse({"error": message, "kind": "Refused"}, status_code=status)
    else:
        response = PlainTextResponse(f"error: {message}\n", status_code=status)
    response.headers.update(web_guard.SECURITY_HEADERS)
    return response


def _guard(app: FastAPI, api_key: str | None, allowed_hosts: tuple[str, ...]) -> None:
    """What every request passes before a handler (the Host rule, numbers in range, a write's
    Origin), and the security headers every answer carries."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        host = request.headers.get("host")
        if not web_guard.host_allowed(host, api_key is not None, allowed_hosts):
            return _refusal(request, 421, web_guard.host_refusal(host))
        problem = _out_of_range(request)
        if problem:
            return _refusal(request, 400, problem)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            # a write from another site's page: the browser names that site in Origin
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc.lower() != (host or "").lower():
                return _refusal(request, 403, f"cross-site write refused (Origin {origin[:100]} is not this dashboard)")
        response = await call_next(request)
        response.headers["X-Response-Ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
        for key, value in web_guard.SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _refusal(request, 400, f"{where or 'request'}: {first.get('msg', 'invalid')}")


def create_app(registry: Registry, api_key: str | None = None, allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The dashboard app over ``registry``; writes enabled only when ``api_key`` is set.
    Without a key only loopback ``Host`` names (and ``allowed_hosts``) are answered."""
    app = FastAPI(title="portfolio dashboard", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.dashboard = DashboardState(registry, api_key)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(PortfolioError, _refused)
    _guard(app, api_key, allowed_hosts)
    app.include_router(pages.router)
    app.include_router(api.router)
    return app


async def _refused(request: Request, exc: PortfolioError):
    status = exc.status if isinstance(exc, WriteRefused) else 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, InvalidState) else 400
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message, "kind": type(exc).__name__}, status_code=status)
    return dashboard(request).page("message.html", status=status, message=message, ok=False,
                                   title="Refused" if status in (401, 403, 409) else "Not found" if status == 404 else "Error")
