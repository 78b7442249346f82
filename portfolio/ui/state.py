"""The dashboard's shared state, kept on ``app.state.dashboard``: the registry, the API key
(writes are enabled only with one) and the template environment. Handlers (`ui.pages`,
`ui.api`) reach it through the request."""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from portfolio.errors import PortfolioError

HERE = Path(__file__).parent


class WriteRefused(PortfolioError):
    """A write without (or with a wrong) API key, or on a read-only dashboard."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def version_href(ref: str) -> str:
    """The page of version ``NAME@V``."""
    name, _, number = ref.rpartition("@")
    return f"/versions/{quote(name, safe='')}/{number}"


def snapshot_href(ref: str) -> str:
    """The page of snapshot ``NAME@V``."""
    name, _, number = ref.rpartition("@")
    return f"/datasets/{quote(name, safe='')}/{number}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["when"] = lambda dt: dt.strftime("%Y-%m-%d %H:%M") if dt else "-"
    env.filters["num"] = lambda x, fmt=".4f": "-" if x is None else format(x, fmt)
    env.filters["q"] = lambda s: quote(str(s), safe="")
    env.filters["tojson_pretty"] = lambda x: json.dumps(x, indent=2, sort_keys=True, default=str)
    return env


class DashboardState:
    """What every dashboard request shares."""

    def __init__(self, registry, api_key: str | None):
        self.registry, self.api_key = registry, api_key
        self.env = _environment()
        self.env.globals.update(version_href=version_href, snapshot_href=snapshot_href, writable=api_key is not None)

    def page(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A rendered template, with its render time in ``Server-Timing``."""
        started = time.perf_counter()
        body = self.env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status, headers={"Server-Timing": f"render;dur={(time.perf_counter() - started) * 1000:.1f}"})

    def check_key(self, given: str | None) -> None:
        """Refuse a write unless the dashboard has a key and ``given`` is it."""
        if self.api_key is None:
            raise WriteRefused("this dashboard is read-only: start it with `portfolio ui --api-key KEY` to allow writes", 403)
        if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise WriteRefused("missing or wrong API key: writes need the key `portfolio ui` was started with", 401)


def dashboard(request: Request) -> DashboardState:
    """The state of the app serving ``request``."""
    return request.app.state.dashboard


def api_key_of(request: Request) -> str | None:
    """The key a JSON API request carries (``Authorization: Bearer KEY`` or ``X-API-Key``)."""
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
