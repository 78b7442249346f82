"""Everything upstream of a version, in a fixed number of queries.

One recursive CTE walks the parent edges from the version to every ancestor (merges and
stacks make it a DAG, not a chain; ``UNION`` keeps each ancestor once). A handful of
queries then fetch the versions, parent edges, dataset edges and runs of that set, so the
cost does not grow with one round trip per hop.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.registry import entities as E
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    BaseModelRow,
    DataEdgeRow,
    DatasetSnapshotRow,
    LineageEdgeRow,
    RunRow,
)
from portfolio.registry.queries import to_base, to_run, to_versions


def ancestors_cte(version_id: int) -> sa.CTE:
    """A recursive CTE of the version's id and every ancestor's id."""
    start = sa.select(sa.literal(version_id, sa.Integer).label("id"))
    anc = start.cte("ancestors", recursive=True)
    step = sa.select(LineageEdgeRow.parent_id).join(anc, LineageEdgeRow.child_id == anc.c.id)
    return anc.union(step)


def lineage(session: Session, root: AdapterVersionRow) -> E.Lineage:
    """The full upstream lineage of ``root``."""
    anc = ancestors_cte(root.id)
    ids = sa.select(anc.c.id)
    rows = session.scalars(
        sa.select(AdapterVersionRow).where(AdapterVersionRow.id.in_(ids)).order_by(AdapterVersionRow.id)
    ).all()
    versions = to_versions(session, rows)
    label = {r.id: v.ref for r, v in zip(rows, versions)}

    parents = [
        E.ParentEdge(child=label[e.child_id], parent=label[e.parent_id], relation=e.relation, recipe=dict(e.recipe))
        for e in session.scalars(
            sa.select(LineageEdgeRow)
            .where(LineageEdgeRow.child_id.in_(ids))
            .order_by(LineageEdgeRow.child_id.desc(), LineageEdgeRow.position)
        )
    ]
    data = [
        E.DataEdge(
            version=label[edge.version_id],
            snapshot=f"{snap.name}@{snap.version}",
            role=edge.role,
            sha256=snap.sha256,
            domain=snap.domain,
            n_rows=edge.n_rows,
            row_ids=list(edge.row_ids) if edge.row_ids is not None else None,
            files=list(snap.files),
        )
        for edge, snap in session.execute(
            sa.select(DataEdgeRow, DatasetSnapshotRow)
            .join(DatasetSnapshotRow, DatasetSnapshotRow.id == DataEdgeRow.snapshot_id)
            .where(DataEdgeRow.version_id.in_(ids))
            .order_by(DataEdgeRow.version_id.desc(), DataEdgeRow.id)
        )
    ]
    run_ids = {r.run_id for r in rows if r.run_id}
    runs = []
    if run_ids:
        names = dict(session.execute(sa.select(AdapterRow.id, AdapterRow.name)).all())
        runs = [to_run(r, names) for r in session.scalars(sa.select(RunRow).where(RunRow.id.in_(run_ids)).order_by(RunRow.id))]
    base = session.scalar(
        sa.select(BaseModelRow).join(AdapterRow, AdapterRow.base_model_id == BaseModelRow.id).where(AdapterRow.id == root.adapter_id)
    )
    # The root first, then its ancestors newest first.
    ordered = [v for r, v in zip(rows, versions) if r.id == root.id]
    ordered += [v for r, v in reversed(list(zip(rows, versions))) if r.id != root.id]
    return E.Lineage(
        root=label[root.id],
        base_model=to_base(base),
        versions=ordered,
        parents=parents,
        data=data,
        runs=runs,
    )
