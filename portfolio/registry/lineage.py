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
    # Core rows (plain tuples with attribute access), not ORM objects: a lineage of 10,000
    # hops would otherwise spend most of its time building identity-mapped instances.
    rows = session.execute(
        sa.select(AdapterVersionRow.__table__).where(AdapterVersionRow.id.in_(ids)).order_by(AdapterVersionRow.id)
    ).all()
    versions = to_versions(session, rows)
    label = {r.id: v.ref for r, v in zip(rows, versions)}

    parents = [
        E.ParentEdge(child=label[child], parent=label[parent], relation=relation, recipe=dict(recipe))
        for child, parent, relation, recipe in session.execute(
            sa.select(LineageEdgeRow.child_id, LineageEdgeRow.parent_id, LineageEdgeRow.relation, LineageEdgeRow.recipe)
            .where(LineageEdgeRow.child_id.in_(ids))
            .order_by(LineageEdgeRow.child_id.desc(), LineageEdgeRow.position)
        )
    ]
    edges = session.execute(
        sa.select(DataEdgeRow.version_id, DataEdgeRow.snapshot_id, DataEdgeRow.role, DataEdgeRow.row_ids, DataEdgeRow.n_rows)
        .where(DataEdgeRow.version_id.in_(ids))
        .order_by(DataEdgeRow.version_id.desc(), DataEdgeRow.id)
    ).all()
    snapshots = {
        s.id: s
        for s in session.execute(
            sa.select(DatasetSnapshotRow.__table__).where(DatasetSnapshotRow.id.in_({e.snapshot_id for e in edges}))
        )
    } if edges else {}
    data = []
    for version_id, snapshot_id, role, row_ids, n_rows in edges:
        snap = snapshots[snapshot_id]
        data.append(
            E.DataEdge(
                version=label[version_id],
                snapshot=f"{snap.name}@{snap.version}",
                role=role,
                sha256=snap.sha256,
                domain=snap.domain,
                n_rows=n_rows,
                row_ids=list(row_ids) if row_ids is not None else None,
                files=list(snap.files),
            )
        )
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
