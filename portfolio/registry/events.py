"""One stream of what happened to the portfolio, read from the append-only records that already
hold it: alias events (set, promote, refused, override, rollback, remove), route events (route
set, remove, rollback), revalidations that found drift, and data revocations and purges. Nothing is written twice; an event's
id is its source and row id (``alias:12``), and a cursor is the last row id seen per source.
Webhooks (`registry.webhooks`) deliver the same events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.registry import entities as E
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasEventRow,
    DataEventRow,
    DatasetSnapshotRow,
    RevalidationRow,
    SuiteSnapshotRow,
)
from portfolio.registry.serving_rows import RouteEventRow, RouterRow

SOURCES = ("alias", "route", "drift", "data")
KINDS = ("set", "promote", "refused", "override", "rollback", "remove", "route", "drift", "revoke", "purge")
Cursor = dict[str, int]


@dataclass(frozen=True)
class Event(E.Entity):
    """One thing that happened."""

    id: str  # "alias:12", "route:3", "drift:5"
    kind: str  # one of KINDS
    subject: str  # the adapter or the router
    summary: str
    reason: str | None
    at: datetime
    data: dict[str, Any]


def read_events(session: Session, after: Cursor | None = None, limit: int = 1000) -> tuple[list[Event], Cursor]:
    """Events after ``after`` (all when None), oldest first, at most ``limit`` per source, and
    the cursor after them."""
    after = {s: 0 for s in SOURCES} | dict(after or {})
    cursor = dict(after)
    adapters = dict(session.execute(sa.select(AdapterRow.id, AdapterRow.name)).all())
    events: list[Event] = []

    rows = session.scalars(sa.select(AliasEventRow).where(AliasEventRow.id > after["alias"]).order_by(AliasEventRow.id).limit(limit)).all()
    ids = {i for r in rows for i in (r.from_version_id, r.to_version_id) if i}
    numbers = dict(session.execute(sa.select(AdapterVersionRow.id, AdapterVersionRow.version).where(AdapterVersionRow.id.in_(ids))).all()) if ids else {}
    for r in rows:
        name = adapters[r.adapter_id]
        before = f"{name}@{numbers[r.from_version_id]}" if r.from_version_id else None
        target = f"{name}@{numbers[r.to_version_id]}" if r.to_version_id else None
        summary = {"refused": f"{name}@{r.alias} stays at {before or '-'}: {target} refused",
                   "remove": f"{name}@{r.alias} removed (was {before})"}.get(r.action, f"{name}@{r.alias} -> {target} (was {before or '-'})")
        events.append(Event(f"alias:{r.id}", r.action, name, summary + (" (forced)" if r.forced else ""), r.reason, E.as_utc(r.created_at),
                            {"adapter": name, "alias": r.alias, "from": before, "to": target, "forced": bool(r.forced)}))
        cursor["alias"] = r.id

    routers = dict(session.execute(sa.select(RouterRow.id, RouterRow.name)).all())
    for r in session.scalars(sa.select(RouteEventRow).where(RouteEventRow.id > after["route"]).order_by(RouteEventRow.id).limit(limit)):
        name = routers[r.router_id]
        what = {"set": f"rule {r.rule}", "remove": f"rule {r.rule} removed", "rollback": "rolled back"}.get(r.action, r.action)
        events.append(Event(f"route:{r.id}", "route", name, f"router {name} v{r.version}: {what}", r.reason, E.as_utc(r.created_at),
                            {"router": name, "version": r.version, "action": r.action, "rule": r.rule, "rules": list(r.rules)}))
        cursor["route"] = r.id

    drift = session.execute(
        sa.select(RevalidationRow, AdapterVersionRow.adapter_id, AdapterVersionRow.version, DatasetSnapshotRow.name,
                  DatasetSnapshotRow.version, SuiteSnapshotRow.name, SuiteSnapshotRow.version)
        .join(AdapterVersionRow, AdapterVersionRow.id == RevalidationRow.version_id)
        .outerjoin(DatasetSnapshotRow, DatasetSnapshotRow.id == RevalidationRow.snapshot_id)
        .outerjoin(SuiteSnapshotRow, SuiteSnapshotRow.id == RevalidationRow.suite_id)
        .where(RevalidationRow.id > after["drift"]).order_by(RevalidationRow.id).limit(limit)
    ).all()
    for r, adapter_id, number, snap, snap_v, suite, suite_v in drift:
        cursor["drift"] = r.id
        if not r.drifted:
            continue
        ref, on = f"{adapters[adapter_id]}@{number}", f"{snap}@{snap_v}" if snap else f"{suite}@{suite_v}"
        events.append(Event(f"drift:{r.id}", "drift", adapters[adapter_id], f"{ref} drifted on {on}: {r.metric} {r.value:.4f} vs {r.baseline:.4f}",
                            None, E.as_utc(r.created_at), {"version": ref, "on": on, "metric": r.metric, "value": r.value,
                                                           "baseline": r.baseline, "threshold": r.threshold}))
    for r, name, number, sha in session.execute(
        sa.select(DataEventRow, DatasetSnapshotRow.name, DatasetSnapshotRow.version, DatasetSnapshotRow.sha256)
        .join(DatasetSnapshotRow, DatasetSnapshotRow.id == DataEventRow.snapshot_id)
        .where(DataEventRow.id > after["data"]).order_by(DataEventRow.id).limit(limit)
    ):
        cursor["data"] = r.id
        ref = f"{name}@{number}"
        what = "revoked" if r.action == "revoke" else f"purged ({r.detail.get('bytes', 0):,} bytes deleted)"
        events.append(Event(f"data:{r.id}", r.action, ref, f"dataset {ref} {what} by {r.actor}", r.reason, E.as_utc(r.created_at),
                            {"snapshot": ref, "sha256": sha, "actor": r.actor, **dict(r.detail or {})}))
    events.sort(key=lambda e: (e.at, e.id))
    return events, cursor


def latest_cursor(session: Session) -> Cursor:
    """The cursor after every event recorded so far (what "from now on" starts at)."""
    return {source: session.scalar(sa.select(sa.func.coalesce(sa.func.max(table.id), 0))) or 0
            for source, table in (("alias", AliasEventRow), ("route", RouteEventRow), ("drift", RevalidationRow), ("data", DataEventRow))}
