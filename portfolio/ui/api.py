"""The dashboard's JSON API under ``/api`` (documented at ``/api/docs``): the same data as the
pages, and the writes, which need the API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from portfolio.errors import InvalidState
from portfolio.registry.entities import jsonable
from portfolio.ui.state import api_key_of, dashboard
from portfolio.ui.views import (dataset_data, do_promote, do_revoke, do_rollback, json_body, matrix_data, schedule_data,
                                version_data)

router = APIRouter(prefix="")





@router.get("/api/adapters", tags=["read"])
def api_adapters(request: Request, q: str = "", domain: str = "", status: str = "", flag: str = "", page_no: int = 1, per_page: int = 50) -> dict[str, Any]:
    registry = dashboard(request).registry
    """Adapters with their versions' statuses, aliases, flags and last evaluation, paged."""
    result = registry.browse.adapters(q, domain, status, flag, page_no, per_page)
    return result.to_dict() | {"pages": result.pages}


@router.get("/api/adapters/{name}", tags=["read"])
def api_adapter(request: Request, name: str, page_no: int = 1, per_page: int = 50) -> dict[str, Any]:
    registry = dashboard(request).registry
    """One adapter's versions, newest first, paged."""
    result = registry.browse.versions(name, page_no, per_page)
    return result.to_dict() | {"pages": result.pages, "gate": registry.gates.get(name)}


@router.get("/api/adapters/{name}/aliases", tags=["read"])
def api_aliases(request: Request, name: str) -> list[dict[str, Any]]:
    registry = dashboard(request).registry
    """Every alias move of the adapter (promotions, refusals, overrides, rollbacks), oldest first."""
    return [e.to_dict() for e in registry.alias_history(name)]


@router.get("/api/adapters/{name}/matrix", tags=["read"])
def api_matrix(request: Request, name: str, metric: str = "loss") -> dict[str, Any]:
    registry = dashboard(request).registry
    """The versions × snapshots matrix of ``metric`` with forgetting and BWT, and the history."""
    data = matrix_data(registry, name, metric)
    return jsonable({**data, "values": [{"model": r, "snapshot": c, "value": v} for (r, c), v in data["values"].items()]})


@router.get("/api/versions/{name}/{number}", tags=["read"])
def api_version(request: Request, name: str, number: int) -> dict[str, Any]:
    registry = dashboard(request).registry
    """One version: metadata, run, evaluations, suite results, alias events, traffic."""
    data = version_data(registry, f"{name}@{number}")
    data.pop("lineage")  # its own route below
    return jsonable(data)


@router.get("/api/versions/{name}/{number}/lineage", tags=["read"], response_model=None)
def api_lineage(request: Request, name: str, number: int, format: str = "json", depth: int | None = None) -> Response:
    registry = dashboard(request).registry
    """The version's lineage as JSON, DOT or Mermaid (``depth``: nearest generations only)."""
    from portfolio.lineage_format import render_dot, render_mermaid

    if format not in ("json", "dot", "mermaid"):
        raise InvalidState(f"unknown format {format!r}; use json, dot or mermaid")
    lin = registry.lineage(f"{name}@{number}", depth)
    if format == "json":
        return JSONResponse(lin.to_dict())
    return PlainTextResponse((render_dot if format == "dot" else render_mermaid)(lin))


@router.get("/api/datasets", tags=["read"])
def api_datasets(request: Request, name: str = "") -> list[dict[str, Any]]:
    registry = dashboard(request).registry
    """Every dataset snapshot (of one dataset with ``name``), with revocation state."""
    return [s.to_dict() | {"revoked": s.revoked, "purged": s.purged} for s in registry.data.list(name or None)]


@router.get("/api/datasets/{name}/{number}", tags=["read"])
def api_dataset(request: Request, name: str, number: int) -> dict[str, Any]:
    registry = dashboard(request).registry
    """One snapshot: provenance, a preview of its rows, reverse lineage."""
    data = dataset_data(registry, f"{name}@{number}")
    return jsonable(data)


@router.get("/api/datasets/{name}/{number}/uses", tags=["read"])
def api_uses(request: Request, name: str, number: int, deployed: bool = False) -> dict[str, Any]:
    registry = dashboard(request).registry
    """Every version downstream of the snapshot, with edges and aliases."""
    return registry.governance.uses(f"{name}@{number}", deployed).to_dict()


@router.get("/api/schedules", tags=["read"])
def api_schedules(request: Request) -> dict[str, Any]:
    registry = dashboard(request).registry
    """Schedules, the newest jobs and runs, with states and errors."""
    return jsonable(schedule_data(registry))


@router.get("/api/events", tags=["read"])
def api_events(request: Request, limit: int = 200) -> list[dict[str, Any]]:
    registry = dashboard(request).registry
    """The newest events (alias moves, routes, drift, revocations), newest first."""
    return [e.to_dict() for e in registry.events.recent(max(1, min(limit, 1000)))]


@router.post("/api/versions/{name}/{number}/promote", tags=["write"])
async def api_promote(request: Request, name: str, number: int) -> dict[str, Any]:
    registry = dashboard(request).registry
    """Promote through the gates (as `portfolio promote`); body ``{"alias", "reason", "force"}``. Needs the API key."""
    dashboard(request).check_key(api_key_of(request))
    body = await json_body(request)
    return do_promote(registry, f"{name}@{number}", body.get("alias", "production"), body.get("reason", ""), bool(body.get("force")))


@router.post("/api/adapters/{name}/rollback", tags=["write"])
async def api_rollback(request: Request, name: str) -> dict[str, Any]:
    registry = dashboard(request).registry
    """Move an alias back (as `portfolio rollback`); body ``{"alias", "reason", "force"}``. Needs the API key."""
    dashboard(request).check_key(api_key_of(request))
    body = await json_body(request)
    return do_rollback(registry, name, body.get("alias", "production"), body.get("reason", ""), bool(body.get("force")))


@router.post("/api/datasets/{name}/{number}/revoke", tags=["write"])
async def api_revoke(request: Request, name: str, number: int) -> dict[str, Any]:
    registry = dashboard(request).registry
    """Revoke a snapshot (as `portfolio data revoke`); body ``{"reason"}``. Needs the API key."""
    dashboard(request).check_key(api_key_of(request))
    body = await json_body(request)
    return do_revoke(registry, f"{name}@{number}", body.get("reason", ""), client=request.client.host if request.client else "?")
