"""The dashboard's HTML pages and the forms that write from them, as module-level handlers
on one router; the data each page shows comes from `ui.views`."""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from portfolio.errors import InvalidState
from portfolio.ui import svg
from portfolio.ui.state import dashboard, snapshot_href, version_href
from portfolio.ui.views import (MAX_FORM_BYTES, dataset_data, do_promote, do_revoke, do_rollback, matrix_data, schedule_data,
                                tune_data, version_data)

router = APIRouter()





@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def overview(request: Request, q: str = "", domain: str = "", status: str = "", flag: str = "", page_no: int = 1, per_page: int = 50):
    registry = dashboard(request).registry
    result = registry.browse.adapters(q, domain, status, flag, page_no, per_page)
    base = {k: v for k, v in result.filters.items() if v}
    return dashboard(request).page("overview.html", result=result, domains=registry.browse.domains(), filters=result.filters,
                page_link=lambda n: "/?" + urlencode(base | {"page_no": n, "per_page": result.per_page}),
                statuses=["candidate", "active", "deprecated", "archived"])


@router.get("/adapters/{name}", response_class=HTMLResponse, include_in_schema=False)
def adapter(request: Request, name: str, page_no: int = 1):
    registry = dashboard(request).registry
    versions = registry.browse.versions(name, page_no)
    return dashboard(request).page("adapter.html", name=name, versions=versions, gate=registry.gates.get(name), summary=registry.browse.summary(name),
                page_link=lambda n: f"/adapters/{quote(name, safe='')}?page_no={n}")


@router.get("/adapters/{name}/aliases", response_class=HTMLResponse, include_in_schema=False)
def aliases(request: Request, name: str):
    registry = dashboard(request).registry
    history = list(reversed(registry.alias_history(name)))
    return dashboard(request).page("aliases.html", name=name, history=history[:500], total=len(history))


@router.get("/adapters/{name}/matrix", response_class=HTMLResponse, include_in_schema=False)
def matrix(request: Request, name: str, metric: str = "loss"):
    registry = dashboard(request).registry
    data = matrix_data(registry, name, metric)
    heat = svg.heatmap_svg(data["rows"], data["cols"], data["values"], data["lower_is_better"],
                           lambda r: None if r.startswith("base:") else version_href(r), snapshot_href,
                           f"{metric} of {name}'s versions on each snapshot")
    return dashboard(request).page("matrix.html", name=name, metric=metric, data=data, heat=heat, history=svg.history_svg(data["history"], metric))


@router.get("/adapters/{name}/tune", response_class=HTMLResponse, include_in_schema=False)
def tune(request: Request, name: str):
    registry = dashboard(request).registry
    runs = tune_data(registry, name)
    for t in runs:
        t["front"] = svg.front_svg(t["candidates"], t["incumbent"], t["data"])
    return dashboard(request).page("tune.html", name=name, runs=runs)


@router.get("/versions/{name}/{number}", response_class=HTMLResponse, include_in_schema=False)
def version(request: Request, name: str, number: int):
    registry = dashboard(request).registry
    data = version_data(registry, f"{name}@{number}")
    drawing = svg.lineage_svg(data["lineage"], version_href, snapshot_href)
    return dashboard(request).page("version.html", **data, drawing=drawing)


@router.get("/datasets", response_class=HTMLResponse, include_in_schema=False)
def datasets(request: Request, name: str = ""):
    registry = dashboard(request).registry
    snaps = registry.data.list(name or None)
    return dashboard(request).page("datasets.html", snapshots=snaps[-500:][::-1], total=len(snaps), name=name)


@router.get("/datasets/{name}/{number}", response_class=HTMLResponse, include_in_schema=False)
def dataset(request: Request, name: str, number: int):
    registry = dashboard(request).registry
    return dashboard(request).page("dataset.html", **dataset_data(registry, f"{name}@{number}"))


@router.get("/schedules", response_class=HTMLResponse, include_in_schema=False)
def schedules(request: Request):
    registry = dashboard(request).registry
    return dashboard(request).page("schedules.html", **schedule_data(registry))


@router.get("/events", response_class=HTMLResponse, include_in_schema=False)
def events(request: Request):
    registry = dashboard(request).registry
    return dashboard(request).page("events.html", events=registry.events.recent(200))


async def _keyed_form(request: Request) -> dict[str, str]:
    """The posted form's fields, once its key field has been checked."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidState(f"form over {MAX_FORM_BYTES:,} bytes")
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    dashboard(request).check_key(form.get("api_key"))
    return form


def _done(message: str, back: str) -> Response:
    return RedirectResponse(back + ("&" if "?" in back else "?") + urlencode({"done": message}), status_code=303)


@router.post("/actions/promote", include_in_schema=False)
async def promote_form(request: Request):
    f = await _keyed_form(request)
    out = do_promote(dashboard(request).registry, f.get("ref", ""), f.get("alias", "production"), f.get("reason", ""), f.get("force") == "on")
    return _done(out["message"], version_href(out["candidate"]))


@router.post("/actions/rollback", include_in_schema=False)
async def rollback_form(request: Request):
    f = await _keyed_form(request)
    out = do_rollback(dashboard(request).registry, f.get("adapter", ""), f.get("alias", "production"), f.get("reason", ""), f.get("force") == "on")
    return _done(out["message"], f"/adapters/{quote(f.get('adapter', ''), safe='')}/aliases")


@router.post("/actions/revoke", include_in_schema=False)
async def revoke_form(request: Request):
    f = await _keyed_form(request)
    out = do_revoke(dashboard(request).registry, f.get("ref", ""), f.get("reason", ""), client=request.client.host if request.client else "?")
    return _done(out["message"], snapshot_href(out["snapshot"]))
