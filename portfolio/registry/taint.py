"""Taint: which versions descend from revoked data, read backwards through lineage.

Below `queries` (which flags tainted versions when it builds entities) and `governance`
(which revokes and purges): plain queries over the data-edge, lineage-edge and data-event
tables, so neither has to import the other.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.registry.models import DataEdgeRow, DataEventRow, DatasetSnapshotRow, LineageEdgeRow

class DataRevoked(InvalidState):
    """A revoked (or purged) snapshot was asked to give its rows or to be used again."""


# the data roles that put rows into the weights; `eval` only scores
WEIGHT_ROLES = ("train", "replay")


def downstream_cte(snapshot_ids: sa.ColumnElement | list[int]) -> sa.CTE:
    """A recursive CTE of ``(snapshot_id, version_id, via, source_id)``: every version
    downstream of the given snapshots. A seed row (``via`` train/replay) has ``source_id``
    NULL; an inherited row names the parent version it came through. ``UNION`` keeps each
    tuple once, so a merge-heavy DAG is walked once per edge, not once per path."""
    d = DataEdgeRow.__table__.c
    e = LineageEdgeRow.__table__.c
    seed = sa.select(d.snapshot_id, d.version_id, d.role.label("via"), sa.cast(sa.null(), sa.Integer).label("source_id")).where(
        d.snapshot_id.in_(snapshot_ids), d.role.in_(WEIGHT_ROLES)
    )
    down = seed.cte("downstream", recursive=True)
    return down.union(
        sa.select(down.c.snapshot_id, e.child_id, e.relation, e.parent_id).join(down, e.parent_id == down.c.version_id)
    )


def data_events(session: Session, snapshot_ids: list[int] | None = None) -> dict[int, dict[str, DataEventRow]]:
    """snapshot id -> {action: event} for the given snapshots (all when None)."""
    query = sa.select(DataEventRow)
    if snapshot_ids is not None:
        if not snapshot_ids:
            return {}
        query = query.where(DataEventRow.snapshot_id.in_(snapshot_ids))
    out: dict[int, dict[str, DataEventRow]] = {}
    for row in session.scalars(query):
        out.setdefault(row.snapshot_id, {})[row.action] = row
    return out


def revoked_snapshot_ids(session: Session) -> set[int]:
    """Every revoked snapshot (purged ones included: purge needs revoke first)."""
    return set(session.scalars(sa.select(DataEventRow.snapshot_id).where(DataEventRow.action == "revoke")))


def taint(session: Session) -> dict[int, list[str]]:
    """version id -> the revoked snapshots (``NAME@V``) it descends from; empty when nothing
    is revoked (one cheap query then)."""
    revoked = revoked_snapshot_ids(session)
    if not revoked:
        return {}
    down = downstream_cte(sorted(revoked))
    rows = session.execute(
        sa.select(down.c.version_id, DatasetSnapshotRow.name, DatasetSnapshotRow.version)
        .join(DatasetSnapshotRow, DatasetSnapshotRow.id == down.c.snapshot_id).distinct()
    ).all()
    out: dict[int, list[str]] = {}
    for version_id, name, version in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        out.setdefault(version_id, []).append(f"{name}@{version}")
    return out
