"""Everything upstream of a version, in a fixed number of queries and little Python per row.

One recursive CTE walks the parent edges from the version up (merges and stacks make it a
DAG, not a chain; ``UNION`` keeps each edge once) and the same statement returns those edges.
The ancestor ids they name go, as one parameter (SQLite's ``json_each``, PostgreSQL's
``= ANY``), to the few queries that fetch the versions, dataset edges, aliases and tags of
that set, so nothing walks twice and no statement grows with the chain.

A chain of 10,000 versions is 30,000 entities, so the per-row work is what counts: rows come
as plain tuples, JSON columns as their text — decoded once per distinct text, since a chain's
configs and recipes repeat — SQLite timestamps through ``datetime.fromisoformat``, entities
filled in place, and the cyclic garbage collector paused while they are built (it would
otherwise scan the growing heap again and again: a third of the time).
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.registry import entities as E
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    BaseModelRow,
    DataEdgeRow,
    DatasetSnapshotRow,
    LineageEdgeRow,
    RunRow,
    VersionTagRow,
)
from portfolio.registry.queries import to_base, to_run
from portfolio.registry.taint import data_events, taint


def upstream_edges_cte(version_id: int, max_depth: int | None = None) -> sa.CTE:
    """A recursive CTE of (edge id, parent id) of every parent edge upstream of a version
    (with ``max_depth``, of those at most that many hops up)."""
    e = LineageEdgeRow.__table__.c
    if max_depth is None:
        up = sa.select(e.id, e.parent_id).where(e.child_id == version_id).cte("upstream", recursive=True)
        return up.union(sa.select(e.id, e.parent_id).join(up, e.child_id == up.c.parent_id))
    up = sa.select(e.id, e.parent_id, sa.literal(1).label("depth")).where(e.child_id == version_id).cte("upstream", recursive=True)
    return up.union(sa.select(e.id, e.parent_id, up.c.depth + 1).join(up, e.child_id == up.c.parent_id).where(up.c.depth < max_depth))


@contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Decoder:
    """JSON text -> value, each distinct text decoded once (PostgreSQL's driver hands back
    values already decoded; they pass through)."""

    def __init__(self) -> None:
        self.memo: dict[str, Any] = {}

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.memo[value]
        except KeyError:
            out = self.memo[value] = json.loads(value)
            return out


def _raw(column: sa.ColumnElement) -> sa.ColumnElement:
    """A JSON or timestamp column as the database stores it, skipping SQLAlchemy's per-row
    processing (done by `_Decoder` and `_when`)."""
    return sa.type_coerce(column, sa.Text)


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite's text, stored as naive UTC: parsing it with the offset is 5x cheaper than .replace
        try:
            return datetime.fromisoformat(value + "+00:00")
        except ValueError:
            value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _tuples(conn: sa.Connection, stmt: sa.Select, params: dict[str, Any] | None = None) -> list[tuple]:
    """The statement's rows as the driver's plain tuples: for the three 10,000-row queries,
    skipping SQLAlchemy's per-row Result machinery saves a fifth of the lineage's time. Only
    for statements whose columns need no result processing (see `_raw`)."""
    compiled = stmt.compile(dialect=conn.dialect)
    values = compiled.construct_params(params or {})
    args = tuple(values[k] for k in compiled.positiontup) if compiled.positional else values
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(str(compiled), args)
        return cursor.fetchall()
    finally:
        cursor.close()


def _among(dialect: str, column: sa.ColumnElement) -> sa.ColumnElement:
    """``column`` is one of the ids bound as ``:ids``."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        return column == sa.any_(sa.bindparam("ids", type_=ARRAY(sa.Integer)))
    return column.in_(sa.select(sa.literal_column("value")).select_from(sa.func.json_each(sa.bindparam("ids", type_=sa.Text))))


def lineage(session: Session, root: AdapterVersionRow, max_depth: int | None = None) -> E.Lineage:
    """The upstream lineage of ``root``: all of it, or its nearest ``max_depth`` generations."""
    with _no_gc():
        return _lineage(session, root, max_depth)


def _lineage(session: Session, root: AdapterVersionRow, max_depth: int | None = None) -> E.Lineage:
    conn = session.connection()
    dialect = conn.dialect.name
    decode = _Decoder()
    e = LineageEdgeRow.__table__.c
    up = upstream_edges_cte(root.id, max_depth)
    if max_depth is not None:  # an edge reached at two depths (a diamond) comes once
        up = sa.select(up.c.id).distinct().subquery()
    edges = _tuples(conn, sa.select(e.child_id, e.parent_id, e.relation, _raw(e.recipe)).join(up, e.id == up.c.id)
                    .order_by(e.child_id.desc(), e.position))
    id_list = sorted({root.id, *(edge[1] for edge in edges)})
    params = {"ids": id_list if dialect == "postgresql" else json.dumps(id_list)}

    v = AdapterVersionRow.__table__.c
    rows = _tuples(conn, sa.select(
        v.id, v.adapter_id, v.version, v.status, v.kind, v.artifact_digest, v.rank, v.alpha, _raw(v.target_modules),
        _raw(v.lora_config), v.n_params, v.description, _raw(v.created_at), v.status_reason, v.successor_id, v.run_id,
        sa.type_coerce(v.drifted, sa.Integer)).where(_among(dialect, v.id)), params)
    adapters = {
        a_id: (name, domain, base)
        for a_id, name, domain, base in conn.execute(
            sa.select(AdapterRow.id, AdapterRow.name, AdapterRow.domain, BaseModelRow.name)
            .join(BaseModelRow, BaseModelRow.id == AdapterRow.base_model_id)
            .where(AdapterRow.id.in_({r[1] for r in rows}))
        )
    }
    label = {r[0]: f"{adapters[r[1]][0]}@{r[2]}" for r in rows}
    aliases, tags, successors = _labels_of(conn, dialect, params, rows, label)

    tainted = taint(session)
    new, Version, no_tags = object.__new__, E.AdapterVersion, {}
    versions = {}
    for (vid, adapter_id, version, status, kind, digest, rank, alpha, targets, config, n_params, description, created,
         status_reason, successor_id, run_id, drifted) in rows:
        name, domain, base_name = adapters[adapter_id]
        versions[vid] = obj = new(Version)
        obj.__dict__.update({
            "adapter": name, "version": version, "domain": domain, "base_model": base_name, "status": status, "kind": kind,
            "artifact_digest": digest, "rank": rank, "alpha": alpha, "target_modules": list(decode(targets)),
            "lora_config": dict(decode(config)), "n_params": n_params, "description": description, "created_at": _when(created),
            "aliases": aliases.get(vid, []), "tags": dict(tags.get(vid, no_tags)), "status_reason": status_reason,
            "successor": successors.get(successor_id) if successor_id else None, "run_id": run_id, "drifted": bool(drifted),
            "tainted_by": list(tainted.get(vid, ())),
        })

    parents = []
    Parent = E.ParentEdge
    for child, parent, relation, recipe in edges:
        parents.append(obj := new(Parent))
        obj.__dict__.update({"child": label[child], "parent": label[parent], "relation": relation, "recipe": dict(decode(recipe))})

    data = _data_edges(session, conn, dialect, params, label, decode)
    run_ids = {r[15] for r in rows if r[15]}
    runs = []
    if run_ids:
        names = dict(session.execute(sa.select(AdapterRow.id, AdapterRow.name)).all())
        runs = [to_run(r, names) for r in session.scalars(sa.select(RunRow).where(RunRow.id.in_(run_ids)).order_by(RunRow.id))]
    base = session.scalar(
        sa.select(BaseModelRow).join(AdapterRow, AdapterRow.base_model_id == BaseModelRow.id).where(AdapterRow.id == root.adapter_id)
    )
    # The root first, then its ancestors newest first.
    ordered = [versions[root.id]] + [versions[i] for i in reversed(id_list) if i != root.id]
    return E.Lineage(
        root=label[root.id],
        base_model=to_base(base),
        versions=ordered,
        parents=parents,
        data=data,
        runs=runs,
    )


def _labels_of(conn, dialect: str, params: dict, rows: list, label: dict[int, str]):
    """(aliases, tags, successor labels) of the lineage's versions, one query each."""
    aliases: dict[int, list[str]] = {}
    for version_id, name in conn.execute(
        sa.select(AliasRow.version_id, AliasRow.name).where(_among(dialect, AliasRow.version_id)).order_by(AliasRow.name), params
    ):
        aliases.setdefault(version_id, []).append(name)
    tags: dict[int, dict[str, str]] = {}
    for version_id, key, value in conn.execute(
        sa.select(VersionTagRow.version_id, VersionTagRow.key, VersionTagRow.value).where(_among(dialect, VersionTagRow.version_id)), params
    ):
        tags.setdefault(version_id, {})[key] = value
    successors = {}
    outside = {r[14] for r in rows if r[14] and r[14] not in label}
    if outside:
        successors = {
            vid: f"{name}@{ver}"
            for vid, name, ver in conn.execute(
                sa.select(AdapterVersionRow.id, AdapterRow.name, AdapterVersionRow.version)
                .join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id).where(AdapterVersionRow.id.in_(outside))
            )
        }
    successors.update(label)
    return aliases, tags, successors


def _data_edges(session: Session, conn, dialect: str, params: dict, label: dict[int, str], decode) -> list[E.DataEdge]:
    """The data edges of the lineage's versions, with their snapshots and revoke/purge flags."""
    new = object.__new__
    d = DataEdgeRow.__table__.c
    data_rows = _tuples(conn, sa.select(d.version_id, d.snapshot_id, d.role, _raw(d.row_ids), d.n_rows)
                        .where(_among(dialect, d.version_id)).order_by(d.version_id.desc(), d.id), params)
    snapshots = {
        s.id: s
        for s in conn.execute(sa.select(DatasetSnapshotRow.__table__).where(DatasetSnapshotRow.id.in_({r[1] for r in data_rows})))
    } if data_rows else {}
    withdrawn = data_events(session, list(snapshots))
    snap_of = {i: (f"{s.name}@{s.version}", s.sha256, s.domain, decode(s.files)) for i, s in snapshots.items()}
    data: list[E.DataEdge] = []
    Edge = E.DataEdge
    for version_id, snapshot_id, role, row_ids, n_rows in data_rows:
        snap_label, sha256, domain, files = snap_of[snapshot_id]
        ids = decode(row_ids)
        data.append(obj := new(Edge))
        obj.__dict__.update({
            "version": label[version_id], "snapshot": snap_label, "role": role, "sha256": sha256, "domain": domain,
            "n_rows": n_rows, "row_ids": list(ids) if ids is not None else None, "files": list(files),
            "revoked": "revoke" in withdrawn.get(snapshot_id, ()), "purged": "purge" in withdrawn.get(snapshot_id, ()),
        })
    return data
