"""What the dashboard's pages and its JSON API show, as plain data shared by both, and the
writes they make (through the same library calls as the CLI, so `promote`, `rollback` and
`data revoke` are recorded exactly as the commands record them)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from portfolio.errors import InvalidState
from portfolio.registry.governance import actor
from portfolio.registry.registry import Registry
from portfolio.ui import svg

LINEAGE_DEPTH = 12  # generations drawn on a version page; the API gives the rest
MATRIX_VERSIONS = 30  # newest versions per adapter in the heat map
MAX_FORM_BYTES = 64 * 1024


async def json_body(request: Request) -> dict[str, Any]:
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


def version_data(registry: Registry, ref: str) -> dict[str, Any]:
    """Everything a version page shows."""
    v = registry.get_version(ref)
    lineage = registry.lineage(v.ref, LINEAGE_DEPTH)
    run = registry.runs.get(v.run_id) if v.run_id else None
    events = [e for e in registry.alias_history(v.adapter) if v.version in (e.from_version, e.to_version)]
    return {"version": v, "lineage": lineage, "run": run, "evaluations": registry.evaluations.list(v.ref),
            "suites": registry.suites.results(model=v.ref), "alias_events": events, "traffic": registry.routes.traffic(v.ref),
            "truncated": _truncated(lineage)}


def _truncated(lineage) -> bool:
    """Whether the page's lineage stopped at `LINEAGE_DEPTH` with more above."""
    return max(svg.generations(lineage).values()) >= LINEAGE_DEPTH


def dataset_data(registry: Registry, ref: str, preview: int = 20) -> dict[str, Any]:
    """Everything a dataset page shows: provenance, the first rows, reverse lineage."""
    snap = registry.data.get(ref)
    rows = [] if snap.purged else [r["data"] for r in registry.data.rows(snap)[:preview]]
    events = registry.governance.events(snap.ref)
    return {"snapshot": snap, "preview": rows, "uses": registry.governance.uses(snap.ref), "events": events}


def matrix_data(registry: Registry, name: str, metric: str) -> dict[str, Any]:
    """The heat map's rows (bases, then the newest `MATRIX_VERSIONS` versions), columns,
    values, the continual-learning numbers and the metric's history."""
    from portfolio.evaluation.report import _lower, build_history, build_matrix

    m = build_matrix(registry, [name], metric=metric, max_versions=MATRIX_VERSIONS)
    history = [h for h in build_history(registry, name, metric) if h["model"] in m.rows]
    return {"rows": m.rows, "cols": m.cols, "values": m.values, "lower_is_better": _lower(metric),
            "continual": [{"adapter": c.adapter, "latest": c.latest, "forgetting": c.forgetting, "bwt": c.bwt, "acc": c.acc, "fwt": c.fwt}
                          for c in m.continual], "history": history}


def tune_data(registry: Registry, name: str, limit: int = 10) -> list[dict[str, Any]]:
    """The adapter's newest finished tune runs, newest first, as `stored_tune` gives them."""
    from portfolio.training.tune import stored_tune

    runs = [r for r in registry.runs.list(adapter=name, status="succeeded", limit=500) if r.kind == "tune"]
    return [stored_tune(registry, r.id) for r in runs[:limit]]


def schedule_data(registry: Registry) -> dict[str, Any]:
    """Schedules, the newest jobs and the newest runs."""
    from portfolio.scheduler.jobs import list_jobs
    from portfolio.scheduler.schedules import list_schedules

    return {"schedules": list_schedules(registry), "jobs": list_jobs(registry, limit=100), "runs": registry.runs.list(limit=100)}


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
    event, uses = registry.governance.revoke(ref, _need_reason(reason, "revoking data"), who=f"{actor()} via ui from {client}")
    return {"snapshot": event.snapshot, "tainted": [u.version for u in uses.uses],
            "message": f"revoked {event.snapshot}: {len(uses.uses)} version(s) now tainted"}
