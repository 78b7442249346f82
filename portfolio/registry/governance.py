"""Data governance: lineage read backwards, and withdrawing a dataset snapshot.

Forward lineage answers "which data made this version?"; a withdrawal (a licence problem,
personal data found) asks the reverse: which versions did this snapshot produce? Replay keeps
old rows alive in new versions, so the answer is every version that

- was trained on the snapshot, or replayed rows of it (its ``train``/``replay`` data edges), or
- inherits weights from such a version through a ``finetune``, ``merge`` or ``stack`` edge,
  however far down.

One recursive CTE walks that set (`downstream_cte`); evaluation edges do not count, since
scoring a model on data puts none of it in the weights.

Withdrawal is recorded, never erased (``data_events``, append-only, who/when/why):

- **revoke** taints every downstream version: `list`/`show`/the dashboard flag it, alias moves,
  promotions and routes refuse it unless forced with a reason (recorded as an override), and
  training and the scheduler never train on or replay its rows again;
- **purge** (only after revoke) deletes the snapshot's stored bytes (its files and rows) and
  keeps its row: name, sha256, sizes, source, licence, so `lineage` still explains what was
  there. The purge is committed before the bytes go; if the process dies in between, the
  bytes are recorded as removed but still present, and `gc` removes them.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.registry import entities as E
from portfolio.registry import queries, references
from portfolio.registry.taint import WEIGHT_ROLES, DataRevoked, data_events, downstream_cte, taint
from portfolio.registry.namespace import Namespace
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    ArtifactRow,
    DataEdgeRow,
    DataEventRow,
    DatasetSnapshotRow,
    utcnow,
)

@dataclass(frozen=True)
class DataEvent(E.Entity):
    """A snapshot revoked or purged: who, when, why."""

    snapshot: str
    sha256: str
    action: str  # revoke | purge
    actor: str
    reason: str | None
    detail: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class DataUse(E.Entity):
    """One version downstream of a snapshot, and every way it got there: ``via`` is ``train``
    or ``replay`` (``source`` is the snapshot, ``rows`` how many of its rows) or a parent
    relation such as ``finetune`` or ``merge`` (``source`` is the parent version)."""

    version: str
    status: str
    aliases: list[str]
    depth: int  # 0: used the snapshot itself; n: inherits through n parent edges
    edges: list[dict[str, Any]]
    routes: list[str] = field(default_factory=list)  # "ROUTER: RULE" of router rules that reach it

    @property
    def deployed(self) -> bool:
        """Whether serving reaches it: an alias points at it, or a router rule does."""
        return bool(self.aliases or self.routes)


@dataclass(frozen=True)
class DataUses(E.Entity):
    """Reverse lineage of one snapshot."""

    snapshot: str
    sha256: str
    revoked: bool
    purged: bool
    uses: list[DataUse] = field(default_factory=list)


def actor() -> str:
    """Who is acting, for the record: ``PORTFOLIO_USER``, else the login name, at the host."""
    name = os.environ.get("PORTFOLIO_USER")
    if not name:
        try:
            name = getpass.getuser()
        except Exception:  # no login name in some containers
            name = "unknown"
    return f"{name}@{socket.gethostname()}"[:200]


def to_event(row: DataEventRow, snapshot: DatasetSnapshotRow) -> DataEvent:
    """Row -> entity."""
    return DataEvent(f"{snapshot.name}@{snapshot.version}", snapshot.sha256, row.action, row.actor, row.reason,
                     dict(row.detail or {}), E.as_utc(row.created_at))


def uses(session: Session, ref: str, deployed: bool = False) -> DataUses:
    """Reverse lineage of snapshot ``ref``: every downstream version with how it got there,
    nearest first (`deployed`: only those serving reaches, through an alias or a route)."""
    snap = queries.snapshot_row(session, ref)
    events = data_events(session, [snap.id]).get(snap.id, {})
    down = downstream_cte([snap.id])
    # labels come joined to the walk, not through an IN list that would grow with it; a
    # parent named by an inherited row is itself downstream, so it is labelled here too
    found = session.execute(
        sa.select(down.c.version_id, down.c.via, down.c.source_id, AdapterRow.name, AdapterVersionRow.version, AdapterVersionRow.status)
        .join(AdapterVersionRow, AdapterVersionRow.id == down.c.version_id).join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id)
    ).all()
    rows = [(vid, via, source) for vid, via, source, *_ in found]
    label = {vid: (f"{name}@{number}", status) for vid, _, _, name, number, status in found}
    aliases: dict[int, list[str]] = {}
    walked = sa.select(down.c.version_id).distinct().subquery()
    for vid, name in session.execute(sa.select(AliasRow.version_id, AliasRow.name).join(walked, walked.c.version_id == AliasRow.version_id)
                                     .order_by(AliasRow.name)):
        aliases.setdefault(vid, []).append(name)
    n_rows = {(vid, role): n for vid, role, n in session.execute(
        sa.select(DataEdgeRow.version_id, DataEdgeRow.role, DataEdgeRow.n_rows)
        .where(DataEdgeRow.snapshot_id == snap.id, DataEdgeRow.role.in_(WEIGHT_ROLES))
    )}
    edges: dict[int, list[dict[str, Any]]] = {}
    parents: dict[int, set[int]] = {}
    for vid, via, source in rows:
        if source is None:
            edges.setdefault(vid, []).append({"via": via, "source": f"{snap.name}@{snap.version}", "rows": n_rows.get((vid, via))})
        else:
            edges.setdefault(vid, []).append({"via": via, "source": label[source][0], "rows": None})
            parents.setdefault(vid, set()).add(source)
    # depth: parent edges from the nearest version that used the snapshot itself (a
    # breadth-first walk from all of those at once)
    children: dict[int, list[int]] = {}
    for vid, ps in parents.items():
        for p in ps:
            children.setdefault(p, []).append(vid)
    depth = {vid: 0 for vid, via, source in rows if source is None}
    queue = deque(depth)
    while queue:
        p = queue.popleft()
        for child in children.get(p, []):
            if child not in depth:
                depth[child] = depth[p] + 1
                queue.append(child)
    reached = _routed(session)
    out = []
    for vid, es in edges.items():
        ref = label[vid][0]
        name = ref.rsplit("@", 1)[0]
        routes = sorted({r for target in [ref] + [f"{name}@{a}" for a in aliases.get(vid, [])] for r in reached.get(target, [])})
        out.append(DataUse(ref, label[vid][1], aliases.get(vid, []), depth[vid],
                           sorted(es, key=lambda x: (x["via"] not in WEIGHT_ROLES, x["via"], x["source"])), routes))
    out.sort(key=lambda u: (u.depth, u.version.split("@")[0], int(u.version.rsplit("@", 1)[1])))
    if deployed:
        out = [u for u in out if u.deployed]
    return DataUses(f"{snap.name}@{snap.version}", snap.sha256, "revoke" in events, "purge" in events, out)


def _routed(session: Session) -> dict[str, list[str]]:
    """Route target (``NAME@V`` or ``NAME@alias``, as written in the rule) -> the router rules
    sending requests there, from each router's current rule set."""
    from portfolio.registry.serving_rows import RouteEventRow, RouterRow
    from portfolio.routing import Rule

    latest = sa.select(RouteEventRow.router_id, sa.func.max(RouteEventRow.version).label("v")).group_by(RouteEventRow.router_id).subquery()
    out: dict[str, list[str]] = {}
    for name, rules in session.execute(
        sa.select(RouterRow.name, RouteEventRow.rules).join(RouteEventRow, RouteEventRow.router_id == RouterRow.id)
        .join(latest, sa.and_(latest.c.router_id == RouteEventRow.router_id, latest.c.v == RouteEventRow.version))
    ):
        for rule in rules or []:
            out.setdefault(rule["to"], []).append(f"{name}: {Rule(**rule).label}")
    return out


def revoke(session: Session, ref: str, reason: str, who: str | None = None) -> DataEvent:
    """Record ``ref`` as revoked (see the module docstring)."""
    if not (reason and reason.strip()):
        raise InvalidState("revoking data needs --reason TEXT: the record says why it was withdrawn")
    snap = queries.snapshot_row(session, ref)
    existing = data_events(session, [snap.id]).get(snap.id, {}).get("revoke")
    if existing is not None:
        raise InvalidState(f"{snap.name}@{snap.version} was already revoked on {E.as_utc(existing.created_at):%Y-%m-%d %H:%M} UTC "
                           f"by {existing.actor}: {existing.reason}")
    row = DataEventRow(snapshot_id=snap.id, action="revoke", actor=who or actor(), reason=reason.strip(), detail={})
    session.add(row)
    session.flush()
    return to_event(row, snap)


def plan_purge(session: Session, refs: list[str]) -> tuple[list[DatasetSnapshotRow], list[str]]:
    """(the snapshots to purge, the blobs to delete) after checking each is revoked, not yet
    purged, and shares no bytes with a snapshot that stays."""
    snaps = list({s.id: s for s in (queries.snapshot_row(session, r) for r in refs)}.values())
    events = data_events(session, [s.id for s in snaps])
    for s in snaps:
        label = f"{s.name}@{s.version}"
        if "revoke" not in events.get(s.id, {}):
            raise InvalidState(f"{label} is not revoked; revoke it first: `portfolio data revoke {label} --reason TEXT`")
        if "purge" in events[s.id]:
            raise InvalidState(f"{label} was already purged on {E.as_utc(events[s.id]['purge'].created_at):%Y-%m-%d %H:%M} UTC")
    ids = {s.id for s in snaps}
    digests = list(dict.fromkeys(d for s in snaps for d in [f["sha256"] for f in s.files] + [s.rows_digest]))
    # every live record of any kind (another snapshot, a version's weights or config, a suite)
    # that names one of these blobs keeps it: purging would take bytes it still reads
    others = references.live_references(session, exclude_snapshots=ids)
    for digest in digests:
        holders = others.get(digest)
        if not holders:
            continue
        holder = holders[0]
        kind, _, label = holder.rpartition(" ")
        if kind == "dataset":
            hint = f"revoke it and purge both together: `portfolio data purge {' '.join(refs)} {label}`"
        elif kind == "suite":
            hint = f"suite {label} stores the same bytes and still reads them (suites are never retired), so they cannot be purged"
        else:
            hint = f"version {label} stores the same bytes; archive it first (`portfolio deprecate {label}`, then `portfolio archive {label}`)"
        raise InvalidState(f"{holder} holds identical bytes (blob {digest[:12]}); {hint}")
    return snaps, digests


def record_purge(session: Session, snaps: list[DatasetSnapshotRow], digests: list[str], reason: str | None,
                 who: str | None = None) -> list[DataEvent]:
    """Mark the blobs removed and append one purge event per snapshot (the bytes are deleted
    after this commits)."""
    sizes = {}
    now = utcnow()
    for digest in digests:
        art = session.get(ArtifactRow, digest, with_for_update=True)
        if art is not None:
            sizes[digest] = art.size
            art.removed_at = art.removed_at or now
    out = []
    for s in snaps:
        mine = [d for d in [f["sha256"] for f in s.files] + [s.rows_digest] if d in digests]
        row = DataEventRow(snapshot_id=s.id, action="purge", actor=who or actor(), reason=reason,
                           detail={"blobs": mine, "bytes": sum(sizes.get(d, 0) for d in dict.fromkeys(mine))})
        session.add(row)
        out.append((row, s))
    session.flush()
    return [to_event(r, s) for r, s in out]


def list_events(session: Session, ref: str | None = None) -> list[DataEvent]:
    """Every revocation and purge (of snapshot ``ref`` only, when given), oldest first."""
    query = (sa.select(DataEventRow, DatasetSnapshotRow).join(DatasetSnapshotRow, DatasetSnapshotRow.id == DataEventRow.snapshot_id)
             .order_by(DataEventRow.id))
    if ref is not None:
        query = query.where(DataEventRow.snapshot_id == queries.snapshot_row(session, ref).id)
    rows = session.execute(query).all()
    return [to_event(e, s) for e, s in rows]


class Governance(Namespace):
    """`Registry`'s data-governance methods (the Python API behind `portfolio data uses/revoke/purge`)."""

    def uses(self, ref: str, deployed: bool = False) -> DataUses:
        """Every version downstream of snapshot ``ref`` (trained on it, replayed it, or
        inheriting from one that did), with the edges and the aliases that point at them."""
        with self._read() as session:
            return uses(session, ref, deployed)

    def revoke(self, ref: str, reason: str, who: str | None = None) -> tuple[DataEvent, DataUses]:
        """Revoke snapshot ``ref``; returns the record and the versions it now taints."""
        with self._write() as (session, _put):
            event = revoke(session, ref, reason, who)
        return event, self.uses(ref)

    def purge(self, refs: list[str], reason: str | None = None, who: str | None = None) -> list[DataEvent]:
        """Delete the stored bytes and rows of revoked snapshots, keeping their records."""
        with self._write() as (session, _put):
            snaps, digests = plan_purge(session, list(refs))
            events = record_purge(session, snaps, digests, reason, who)
        # the record is committed first (a purge killed here leaves bytes `gc` removes); the
        # bytes then go under their row locks, re-checked there, like archive and gc, so a
        # writer that recorded the same bytes in between keeps them
        with self._write() as (session, _put):
            references.delete_unless_live(session, self.store, digests)
        self._registry.data.forget_rows()
        return events

    def events(self, ref: str | None = None) -> list[DataEvent]:
        """Every revocation and purge (of snapshot ``ref`` only, when given), oldest first."""
        with self._read() as session:
            return list_events(session, ref)

    def tainted(self, ref: str) -> list[str]:
        """The revoked snapshots version ``ref`` descends from (empty: clean)."""
        with self._read() as session:
            row = queries.version_row(session, ref)
            return taint(session).get(row.id, [])

    def check_usable(self, refs: list[str], purpose: str) -> None:
        """Raise `DataRevoked` if a snapshot of ``refs`` is revoked (``purpose`` says for what)."""
        with self._read() as session:
            snaps = queries.snapshot_rows_many(session, list(refs))
            events = data_events(session, [s.id for s in snaps])
            for s in snaps:
                ev = events.get(s.id, {}).get("revoke")
                if ev is not None:
                    raise DataRevoked(f"{s.name}@{s.version} was revoked on {E.as_utc(ev.created_at):%Y-%m-%d} by {ev.actor} "
                                      f"({ev.reason}); it cannot be used for {purpose}")
