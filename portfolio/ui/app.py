"""The dashboard: FastAPI routes rendering Jinja2 templates, and the same data as JSON under
``/api``. Every handler makes registry calls and formats; nothing here decides anything.

Read-only unless started with an API key. Writes (promote, rollback, revoke) then need the key
(``Authorization: Bearer KEY`` or ``X-API-Key`` on ``/api``, the form's key field on pages)
and a reason, and go through the same library calls as the CLI, so they are recorded exactly
as `portfolio promote`, `portfolio rollback` and `portfolio data revoke` record them.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from portfolio import web_guard
from portfolio.errors import InvalidState, NotFound, PortfolioError
from portfolio.registry.entities import jsonable
from portfolio.registry.governance import actor
from portfolio.registry.refs import MAX_VERSION
from portfolio.registry.registry import Registry
from portfolio.ui import svg

HERE = Path(__file__).parent
LINEAGE_DEPTH = 12  # generations drawn on a version page; the API gives the rest
MATRIX_VERSIONS = 30  # newest versions per adapter in the heat map
MAX_FORM_BYTES = 64 * 1024


class WriteRefused(PortfolioError):
    """A write without (or with a wrong) API key, or on a read-only dashboard."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["when"] = lambda dt: dt.strftime("%Y-%m-%d %H:%M") if dt else "-"
    env.filters["num"] = lambda x, fmt=".4f": "-" if x is None else format(x, fmt)
    env.filters["q"] = lambda s: quote(str(s), safe="")
    env.filters["tojson_pretty"] = lambda x: json.dumps(x, indent=2, sort_keys=True, default=str)
    return env


def version_href(ref: str) -> str:
    """The page of version ``NAME@V``."""
    name, _, number = ref.rpartition("@")
    return f"/versions/{quote(name, safe='')}/{number}"


def snapshot_href(ref: str) -> str:
    """The page of snapshot ``NAME@V``."""
    name, _, number = ref.rpartition("@")
    return f"/datasets/{quote(name, safe='')}/{number}"


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
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    env = _environment()
    env.globals.update(version_href=version_href, snapshot_href=snapshot_href, writable=api_key is not None)

    def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
        started = time.perf_counter()
        body = env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status, headers={"Server-Timing": f"render;dur={(time.perf_counter() - started) * 1000:.1f}"})

    def check_key(given: str | None) -> None:
        if api_key is None:
            raise WriteRefused("this dashboard is read-only: start it with `portfolio ui --api-key KEY` to allow writes", 403)
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise WriteRefused("missing or wrong API key: writes need the key `portfolio ui` was started with", 401)

    def api_key_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")

    @app.exception_handler(PortfolioError)
    async def refused(request: Request, exc: PortfolioError):
        status = exc.status if isinstance(exc, WriteRefused) else 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, InvalidState) else 400
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message, "kind": type(exc).__name__}, status_code=status)
        return page("message.html", status=status, title="Refused" if status in (401, 403, 409) else "Not found" if status == 404 else "Error",
                    message=message, ok=False)

    _guard(app, api_key, allowed_hosts)

    # -- pages ----------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(q: str = "", domain: str = "", status: str = "", flag: str = "", page_no: int = 1, per_page: int = 50):
        result = registry.adapter_page(q, domain, status, flag, page_no, per_page)
        base = {k: v for k, v in result.filters.items() if v}
        return page("overview.html", result=result, domains=registry.domains(), filters=result.filters,
                    page_link=lambda n: "/?" + urlencode(base | {"page_no": n, "per_page": result.per_page}),
                    statuses=["candidate", "active", "deprecated", "archived"])

    @app.get("/adapters/{name}", response_class=HTMLResponse, include_in_schema=False)
    def adapter(name: str, page_no: int = 1):
        versions = registry.version_page(name, page_no)
        return page("adapter.html", name=name, versions=versions, gate=registry.get_gate(name), summary=registry.adapter_summary(name),
                    page_link=lambda n: f"/adapters/{quote(name, safe='')}?page_no={n}")

    @app.get("/adapters/{name}/aliases", response_class=HTMLResponse, include_in_schema=False)
    def aliases(name: str):
        history = list(reversed(registry.alias_history(name)))
        return page("aliases.html", name=name, history=history[:500], total=len(history))

    @app.get("/adapters/{name}/matrix", response_class=HTMLResponse, include_in_schema=False)
    def matrix(name: str, metric: str = "loss"):
        data = matrix_data(registry, name, metric)
        heat = svg.heatmap_svg(data["rows"], data["cols"], data["values"], data["lower_is_better"],
                               lambda r: None if r.startswith("base:") else version_href(r), snapshot_href,
                               f"{metric} of {name}'s versions on each snapshot")
        return page("matrix.html", name=name, metric=metric, data=data, heat=heat, history=svg.history_svg(data["history"], metric))

    @app.get("/versions/{name}/{number}", response_class=HTMLResponse, include_in_schema=False)
    def version(name: str, number: int):
        data = version_data(registry, f"{name}@{number}")
        drawing = svg.lineage_svg(data["lineage"], version_href, snapshot_href)
        return page("version.html", **data, drawing=drawing)

    @app.get("/datasets", response_class=HTMLResponse, include_in_schema=False)
    def datasets(name: str = ""):
        snaps = registry.list_snapshots(name or None)
        return page("datasets.html", snapshots=snaps[-500:][::-1], total=len(snaps), name=name)

    @app.get("/datasets/{name}/{number}", response_class=HTMLResponse, include_in_schema=False)
    def dataset(name: str, number: int):
        return page("dataset.html", **dataset_data(registry, f"{name}@{number}"))

    @app.get("/schedules", response_class=HTMLResponse, include_in_schema=False)
    def schedules():
        return page("schedules.html", **schedule_data(registry))

    @app.get("/events", response_class=HTMLResponse, include_in_schema=False)
    def events():
        return page("events.html", events=registry.recent_events(200))

    # -- writes from pages (forms) --------------------------------------------------------

    async def form(request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise InvalidState(f"form over {MAX_FORM_BYTES:,} bytes")
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}

    def done(message: str, back: str) -> Response:
        return RedirectResponse(back + ("&" if "?" in back else "?") + urlencode({"done": message}), status_code=303)

    @app.post("/actions/promote", include_in_schema=False)
    async def promote_form(request: Request):
        f = await form(request)
        check_key(f.get("api_key"))
        out = do_promote(registry, f.get("ref", ""), f.get("alias", "production"), f.get("reason", ""), f.get("force") == "on")
        return done(out["message"], version_href(out["candidate"]))

    @app.post("/actions/rollback", include_in_schema=False)
    async def rollback_form(request: Request):
        f = await form(request)
        check_key(f.get("api_key"))
        out = do_rollback(registry, f.get("adapter", ""), f.get("alias", "production"), f.get("reason", ""), f.get("force") == "on")
        return done(out["message"], f"/adapters/{quote(f.get('adapter', ''), safe='')}/aliases")

    @app.post("/actions/revoke", include_in_schema=False)
    async def revoke_form(request: Request):
        f = await form(request)
        check_key(f.get("api_key"))
        out = do_revoke(registry, f.get("ref", ""), f.get("reason", ""), client=request.client.host if request.client else "?")
        return done(out["message"], snapshot_href(out["snapshot"]))

    # -- JSON API -------------------------------------------------------------------------

    @app.get("/api/adapters", tags=["read"])
    def api_adapters(q: str = "", domain: str = "", status: str = "", flag: str = "", page_no: int = 1, per_page: int = 50) -> dict[str, Any]:
        """Adapters with their versions' statuses, aliases, flags and last evaluation, paged."""
        result = registry.adapter_page(q, domain, status, flag, page_no, per_page)
        return result.to_dict() | {"pages": result.pages}

    @app.get("/api/adapters/{name}", tags=["read"])
    def api_adapter(name: str, page_no: int = 1, per_page: int = 50) -> dict[str, Any]:
        """One adapter's versions, newest first, paged."""
        result = registry.version_page(name, page_no, per_page)
        return result.to_dict() | {"pages": result.pages, "gate": registry.get_gate(name)}

    @app.get("/api/adapters/{name}/aliases", tags=["read"])
    def api_aliases(name: str) -> list[dict[str, Any]]:
        """Every alias move of the adapter (promotions, refusals, overrides, rollbacks), oldest first."""
        return [e.to_dict() for e in registry.alias_history(name)]

    @app.get("/api/adapters/{name}/matrix", tags=["read"])
    def api_matrix(name: str, metric: str = "loss") -> dict[str, Any]:
        """The versions × snapshots matrix of ``metric`` with forgetting and BWT, and the history."""
        data = matrix_data(registry, name, metric)
        return jsonable({**data, "values": [{"model": r, "snapshot": c, "value": v} for (r, c), v in data["values"].items()]})

    @app.get("/api/versions/{name}/{number}", tags=["read"])
    def api_version(name: str, number: int) -> dict[str, Any]:
        """One version: metadata, run, evaluations, suite results, alias events, traffic."""
        data = version_data(registry, f"{name}@{number}")
        data.pop("lineage")  # its own route below
        return jsonable(data)

    @app.get("/api/versions/{name}/{number}/lineage", tags=["read"], response_model=None)
    def api_lineage(name: str, number: int, format: str = "json", depth: int | None = None) -> Response:
        """The version's lineage as JSON, DOT or Mermaid (``depth``: nearest generations only)."""
        from portfolio.lineage_format import render_dot, render_mermaid

        if format not in ("json", "dot", "mermaid"):
            raise InvalidState(f"unknown format {format!r}; use json, dot or mermaid")
        lin = registry.lineage(f"{name}@{number}", depth)
        if format == "json":
            return JSONResponse(lin.to_dict())
        return PlainTextResponse((render_dot if format == "dot" else render_mermaid)(lin))

    @app.get("/api/datasets", tags=["read"])
    def api_datasets(name: str = "") -> list[dict[str, Any]]:
        """Every dataset snapshot (of one dataset with ``name``), with revocation state."""
        return [s.to_dict() | {"revoked": s.revoked, "purged": s.purged} for s in registry.list_snapshots(name or None)]

    @app.get("/api/datasets/{name}/{number}", tags=["read"])
    def api_dataset(name: str, number: int) -> dict[str, Any]:
        """One snapshot: provenance, a preview of its rows, reverse lineage."""
        data = dataset_data(registry, f"{name}@{number}")
        return jsonable(data)

    @app.get("/api/datasets/{name}/{number}/uses", tags=["read"])
    def api_uses(name: str, number: int, deployed: bool = False) -> dict[str, Any]:
        """Every version downstream of the snapshot, with edges and aliases."""
        return registry.data_uses(f"{name}@{number}", deployed).to_dict()

    @app.get("/api/schedules", tags=["read"])
    def api_schedules() -> dict[str, Any]:
        """Schedules, the newest jobs and runs, with states and errors."""
        return jsonable(schedule_data(registry))

    @app.get("/api/events", tags=["read"])
    def api_events(limit: int = 200) -> list[dict[str, Any]]:
        """The newest events (alias moves, routes, drift, revocations), newest first."""
        return [e.to_dict() for e in registry.recent_events(max(1, min(limit, 1000)))]

    @app.post("/api/versions/{name}/{number}/promote", tags=["write"])
    async def api_promote(name: str, number: int, request: Request) -> dict[str, Any]:
        """Promote through the gates (as `portfolio promote`); body ``{"alias", "reason", "force"}``. Needs the API key."""
        check_key(api_key_of(request))
        body = await _json(request)
        return do_promote(registry, f"{name}@{number}", body.get("alias", "production"), body.get("reason", ""), bool(body.get("force")))

    @app.post("/api/adapters/{name}/rollback", tags=["write"])
    async def api_rollback(name: str, request: Request) -> dict[str, Any]:
        """Move an alias back (as `portfolio rollback`); body ``{"alias", "reason", "force"}``. Needs the API key."""
        check_key(api_key_of(request))
        body = await _json(request)
        return do_rollback(registry, name, body.get("alias", "production"), body.get("reason", ""), bool(body.get("force")))

    @app.post("/api/datasets/{name}/{number}/revoke", tags=["write"])
    async def api_revoke(name: str, number: int, request: Request) -> dict[str, Any]:
        """Revoke a snapshot (as `portfolio data revoke`); body ``{"reason"}``. Needs the API key."""
        check_key(api_key_of(request))
        body = await _json(request)
        return do_revoke(registry, f"{name}@{number}", body.get("reason", ""), client=request.client.host if request.client else "?")

    return app


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidState(f"body over {MAX_FORM_BYTES:,} bytes")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise InvalidState("the body is not JSON; send {\"reason\": \"...\"}") from None
    if not isinstance(data, dict):
        raise InvalidState("the body must be a JSON object")
    return data


def _need_reason(reason: str, what: str) -> str:
    if not (reason and reason.strip()):
        raise InvalidState(f"{what} needs a reason: it is recorded with the change")
    return reason.strip()


# -- what the pages and the API show (plain data, shared by both) ----------------------------


def version_data(registry: Registry, ref: str) -> dict[str, Any]:
    """Everything a version page shows."""
    v = registry.get_version(ref)
    lineage = registry.lineage(v.ref, LINEAGE_DEPTH)
    run = registry.get_run(v.run_id) if v.run_id else None
    events = [e for e in registry.alias_history(v.adapter) if v.version in (e.from_version, e.to_version)]
    return {"version": v, "lineage": lineage, "run": run, "evaluations": registry.evaluations(v.ref),
            "suites": registry.suite_results(model=v.ref), "alias_events": events, "traffic": registry.traffic(v.ref),
            "truncated": _truncated(lineage)}


def _truncated(lineage) -> bool:
    """Whether the page's lineage stopped at `LINEAGE_DEPTH` with more above."""
    return max(svg.generations(lineage).values()) >= LINEAGE_DEPTH


def dataset_data(registry: Registry, ref: str, preview: int = 20) -> dict[str, Any]:
    """Everything a dataset page shows: provenance, the first rows, reverse lineage."""
    snap = registry.get_snapshot(ref)
    rows = [] if snap.purged else [r["data"] for r in registry.snapshot_rows(snap)[:preview]]
    events = registry.data_events(snap.ref)
    return {"snapshot": snap, "preview": rows, "uses": registry.data_uses(snap.ref), "events": events}


def matrix_data(registry: Registry, name: str, metric: str) -> dict[str, Any]:
    """The heat map's rows (bases, then the newest `MATRIX_VERSIONS` versions), columns,
    values, the continual-learning numbers and the metric's history."""
    from portfolio.evaluation.report import _lower, build_history, build_matrix

    m = build_matrix(registry, [name], metric=metric, max_versions=MATRIX_VERSIONS)
    history = [h for h in build_history(registry, name, metric) if h["model"] in m.rows]
    return {"rows": m.rows, "cols": m.cols, "values": m.values, "lower_is_better": _lower(metric),
            "continual": [{"adapter": c.adapter, "latest": c.latest, "forgetting": c.forgetting, "bwt": c.bwt, "acc": c.acc, "fwt": c.fwt}
                          for c in m.continual], "history": history}


def schedule_data(registry: Registry) -> dict[str, Any]:
    """Schedules, the newest jobs and the newest runs."""
    from portfolio.scheduler.jobs import list_jobs
    from portfolio.scheduler.schedules import list_schedules

    return {"schedules": list_schedules(registry), "jobs": list_jobs(registry, limit=100), "runs": registry.list_runs(limit=100)}


def do_promote(registry: Registry, ref: str, alias: str, reason: str, force: bool) -> dict[str, Any]:
    """`portfolio promote`, from the dashboard."""
    from portfolio.evaluation.promote import promote

    out = promote(registry, ref, alias or "production", force=force, reason=_need_reason(reason, "a promotion from the dashboard"),
                  log=lambda *_: None)
    what = ("OVERRIDE: forced" if out.forced else "gates passed") if out.promoted else "refused: " + "; ".join(
        c.name + " " + (c.snapshot or "") for c in out.checks if not c.passed)
    return {"candidate": out.candidate, "alias": out.alias, "promoted": out.promoted, "forced": out.forced,
            "message": f"{out.candidate} -> {out.candidate.split('@')[0]}@{out.alias}: {what}" if out.promoted
            else f"{out.candidate} not promoted to {out.alias}: {what}"}


def do_rollback(registry: Registry, adapter: str, alias: str, reason: str, force: bool) -> dict[str, Any]:
    """`portfolio rollback`, from the dashboard."""
    e = registry.rollback(adapter, alias or "production", _need_reason(reason, "a rollback from the dashboard"), force=force)
    return {"adapter": adapter, "alias": e.alias, "to": e.to_version, "from": e.from_version,
            "message": f"{adapter}@{e.alias} -> {adapter}@{e.to_version} (rolled back from {adapter}@{e.from_version})"}


def do_revoke(registry: Registry, ref: str, reason: str, client: str) -> dict[str, Any]:
    """`portfolio data revoke`, from the dashboard (the actor names the dashboard and the client)."""
    event, uses = registry.revoke_data(ref, _need_reason(reason, "revoking data"), who=f"{actor()} via ui from {client}")
    return {"snapshot": event.snapshot, "tainted": [u.version for u in uses.uses],
            "message": f"revoked {event.snapshot}: {len(uses.uses)} version(s) now tainted"}
