"""Read-side helpers: resolving references to rows and turning rows into entities.

Everything here takes an open session; nothing commits.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import AdapterNotFound, BaseModelNotFound, DatasetNotFound
from portfolio.registry import entities as E
from portfolio.registry.entities import as_utc
from portfolio.registry.models import utcnow
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    BaseModelRow,
    DatasetSnapshotRow,
    RunRow,
    VersionTagRow,
)
from portfolio.registry.refs import Ref, parse_ref


def base_row(session: Session, name: str) -> BaseModelRow:
    """The base model called ``name``."""
    row = session.scalar(sa.select(BaseModelRow).where(BaseModelRow.name == name))
    if row is None:
        known = session.scalars(sa.select(BaseModelRow.name).order_by(BaseModelRow.name)).all()
        hint = f" (registered: {', '.join(known)})" if known else ""
        raise BaseModelNotFound(
            f"no base model {name!r}{hint}; register it with `portfolio base add {name} PATH` "
            "or `portfolio base add smollm2-135m`"
        )
    return row


def snapshot_row(session: Session, text: str) -> DatasetSnapshotRow:
    """The snapshot ``NAME@V`` (or the latest of ``NAME``)."""
    ref = parse_ref(text)
    query = sa.select(DatasetSnapshotRow).where(DatasetSnapshotRow.name == ref.name)
    if isinstance(ref.selector, str):
        raise DatasetNotFound(f"dataset reference {text!r} must name a version: NAME@VERSION")
    if ref.selector is None:
        row = session.scalar(query.order_by(DatasetSnapshotRow.version.desc()).limit(1))
    else:
        row = session.scalar(query.where(DatasetSnapshotRow.version == ref.selector))
    if row is None:
        raise DatasetNotFound(
            f"no dataset snapshot {text!r}; see `portfolio data list`, or add it with "
            f"`portfolio data add {ref.name} FILE --domain DOMAIN`"
        )
    return row


def snapshot_rows_many(session: Session, refs: list[str]) -> list[DatasetSnapshotRow]:
    """The snapshots ``NAME@V`` of ``refs``, in order, in one query per dataset name (a
    scheduler cycle names every earlier drop)."""
    parsed = [parse_ref(r) for r in refs]
    if any(not isinstance(p.selector, int) for p in parsed):
        return [snapshot_row(session, r) for r in refs]
    found = {
        (row.name, row.version): row
        for row in session.scalars(sa.select(DatasetSnapshotRow).where(DatasetSnapshotRow.name.in_({p.name for p in parsed})))
    }
    return [found[(p.name, p.selector)] if (p.name, p.selector) in found else snapshot_row(session, r) for p, r in zip(parsed, refs)]


def adapter_row(session: Session, name: str) -> AdapterRow:
    """The adapter called ``name``."""
    row = session.scalar(sa.select(AdapterRow).where(AdapterRow.name == name))
    if row is None:
        raise AdapterNotFound(
            f"no adapter {name!r}; see `portfolio list`, or import one with "
            f"`portfolio adapter import {name} DIR --base BASE`"
        )
    return row


def version_row(session: Session, ref: str | Ref) -> AdapterVersionRow:
    """The version a reference points at: ``NAME@3``, ``NAME@alias`` or ``NAME`` (latest)."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    adapter = adapter_row(session, ref.name)
    query = sa.select(AdapterVersionRow).where(AdapterVersionRow.adapter_id == adapter.id)
    if ref.selector is None:
        row = session.scalar(query.order_by(AdapterVersionRow.version.desc()).limit(1))
    elif isinstance(ref.selector, int):
        row = session.scalar(query.where(AdapterVersionRow.version == ref.selector))
    else:
        row = session.scalar(
            query.join(AliasRow, AliasRow.version_id == AdapterVersionRow.id).where(
                AliasRow.adapter_id == adapter.id, AliasRow.name == ref.selector
            )
        )
        if row is None:
            raise AdapterNotFound(
                f"adapter {ref.name!r} has no alias {ref.selector!r}; "
                f"set one with `portfolio alias set {ref.name} {ref.selector} VERSION`"
            )
    if row is None:
        raise AdapterNotFound(f"adapter {ref.name!r} has no version {ref.selector}; see `portfolio list --adapter {ref.name}`")
    return row


def to_base(row: BaseModelRow) -> E.BaseModel:
    """Row -> entity."""
    return E.BaseModel(
        name=row.name,
        model_id=row.model_id,
        source=row.source,
        gguf_file=row.gguf_file,
        architecture=row.architecture,
        weights_sha256=row.weights_sha256,
        files=list(row.files),
        n_modules=len(row.modules),
        created_at=as_utc(row.created_at),
    )


def to_snapshot(row: DatasetSnapshotRow, events: dict[str, Any] | None = None) -> E.DatasetSnapshot:
    """Row -> entity. ``events`` are its data events by action (`taint.data_events`);
    when None they are read from the row's session."""
    if events is None:
        from sqlalchemy.orm import object_session

        from portfolio.registry.taint import data_events

        session = object_session(row)
        events = data_events(session, [row.id]).get(row.id, {}) if session is not None else {}
    revoke, purge = events.get("revoke"), events.get("purge")
    return E.DatasetSnapshot(
        name=row.name,
        version=row.version,
        domain=row.domain,
        sha256=row.sha256,
        format=row.format,
        row_count=row.row_count,
        n_bytes=row.n_bytes,
        files=list(row.files),
        rows_digest=row.rows_digest,
        source_uri=row.source_uri,
        license=row.license,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(revoke.created_at) if revoke else None,
        revoked_by=revoke.actor if revoke else None,
        revoke_reason=revoke.reason if revoke else None,
        purged_at=as_utc(purge.created_at) if purge else None,
    )


STALE_HEARTBEAT = timedelta(minutes=15)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(row: RunRow) -> str:
    """A run recorded as running whose process is gone (on this host) or whose heartbeat is
    older than `STALE_HEARTBEAT` was interrupted: killed, out of memory, machine lost."""
    if row.status != "running":
        return row.status
    if row.host == socket.gethostname() and row.pid and not pid_alive(row.pid):
        return "interrupted"
    beat = as_utc(row.heartbeat_at or row.started_at)
    if beat is not None and utcnow() - beat > STALE_HEARTBEAT:
        return "interrupted"
    return "running"


def to_alias_event(row: Any, adapter: str, version_of: Any) -> E.AliasEvent:
    """Row -> entity; ``version_of(version_id)`` gives the version number (None for None)."""
    return E.AliasEvent(adapter, row.alias, row.action, version_of(row.from_version_id), version_of(row.to_version_id),
                        row.forced, row.reason, as_utc(row.created_at))


def to_evaluation(row: Any, model: str, snapshot: str) -> E.Evaluation:
    """Row -> entity, labelled with the model (``NAME@V`` or ``base:NAME``) and ``snapshot``."""
    return E.Evaluation(model, snapshot, row.metric, row.value, row.n_tokens, row.run_id, row.code_version, as_utc(row.created_at))


def to_run(row: RunRow, adapter_names: dict[int, str]) -> E.Run:
    """Row -> entity."""
    return E.Run(
        id=row.id,
        adapter=adapter_names.get(row.adapter_id) if row.adapter_id else (row.config or {}).get("adapter"),
        kind=row.kind,
        status=effective_status(row),
        config=dict(row.config),
        seed=row.seed,
        packages=dict(row.packages),
        code_version=row.code_version,
        metrics=dict(row.metrics),
        error=row.error,
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
    )


def to_versions(session: Session, rows: Iterable[AdapterVersionRow]) -> list[E.AdapterVersion]:
    """Rows -> entities, with adapter, base, aliases, tags and successor filled in using a
    fixed number of queries whatever the number of rows."""
    rows = list(rows)
    if not rows:
        return []
    ids = [r.id for r in rows]
    adapter_ids = {r.adapter_id for r in rows}
    adapters = {
        a.id: (a, b)
        for a, b in session.execute(
            sa.select(AdapterRow, BaseModelRow.name)
            .join(BaseModelRow, BaseModelRow.id == AdapterRow.base_model_id)
            .where(AdapterRow.id.in_(adapter_ids))
        ).all()
    }
    aliases: dict[int, list[str]] = defaultdict(list)
    tags: dict[int, dict[str, str]] = defaultdict(dict)
    for chunk in _chunks(ids):
        for version_id, name in session.execute(
            sa.select(AliasRow.version_id, AliasRow.name).where(AliasRow.version_id.in_(chunk)).order_by(AliasRow.name)
        ):
            aliases[version_id].append(name)
        for version_id, key, value in session.execute(
            sa.select(VersionTagRow.version_id, VersionTagRow.key, VersionTagRow.value).where(
                VersionTagRow.version_id.in_(chunk)
            )
        ):
            tags[version_id][key] = value
    successor_ids = {r.successor_id for r in rows if r.successor_id}
    successors = {}
    if successor_ids:
        successors = {
            vid: f"{name}@{ver}"
            for vid, name, ver in session.execute(
                sa.select(AdapterVersionRow.id, AdapterRow.name, AdapterVersionRow.version)
                .join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id)
                .where(AdapterVersionRow.id.in_(successor_ids))
            )
        }
    from portfolio.registry.taint import taint

    tainted = taint(session)
    out = []
    for r in rows:
        adapter, base_name = adapters[r.adapter_id]
        out.append(
            to_version(
                r, adapter, base_name, aliases.get(r.id, []), tags.get(r.id, {}),
                successors.get(r.successor_id) if r.successor_id else None, tainted.get(r.id),
            )
        )
    return out


def to_version(
    r: AdapterVersionRow,
    adapter: AdapterRow,
    base_name: str,
    aliases: list[str] | None = None,
    tags: dict[str, str] | None = None,
    successor: str | None = None,
    tainted_by: list[str] | None = None,
) -> E.AdapterVersion:
    """One row -> entity, when its adapter and base are already at hand."""
    return E.AdapterVersion(
        adapter=adapter.name,
        version=r.version,
        domain=adapter.domain,
        base_model=base_name,
        status=r.status,
        kind=r.kind,
        artifact_digest=r.artifact_digest,
        rank=r.rank,
        alpha=r.alpha,
        target_modules=list(r.target_modules),
        lora_config=dict(r.lora_config),
        n_params=r.n_params,
        description=r.description,
        created_at=as_utc(r.created_at),
        aliases=aliases or [],
        tags=tags or {},
        status_reason=r.status_reason,
        successor=successor,
        run_id=r.run_id,
        drifted=bool(r.drifted),
        tainted_by=list(tainted_by or []),
    )


def _chunks(ids: list[int], size: int = 900) -> Iterable[list[int]]:
    # SQLite caps bound parameters per statement; stay well under it.
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def model_label(session: Session, version_id: int) -> str:
    """``NAME@V`` of a version id."""
    name, ver = session.execute(
        sa.select(AdapterRow.name, AdapterVersionRow.version).join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id).where(AdapterVersionRow.id == version_id)
    ).one()
    return f"{name}@{ver}"


def adapter_summaries(session: Session) -> list[E.Adapter]:
    """Every adapter with its version count, latest version and aliases."""
    stats = {
        aid: (n, latest)
        for aid, n, latest in session.execute(
            sa.select(AdapterVersionRow.adapter_id, sa.func.count(), sa.func.max(AdapterVersionRow.version)).group_by(
                AdapterVersionRow.adapter_id
            )
        )
    }
    aliases: dict[int, dict[str, int]] = {}
    for aid, alias, ver in session.execute(
        sa.select(AliasRow.adapter_id, AliasRow.name, AdapterVersionRow.version).join(
            AdapterVersionRow, AdapterVersionRow.id == AliasRow.version_id
        )
    ):
        aliases.setdefault(aid, {})[alias] = ver
    out = []
    for a, base_name in session.execute(
        sa.select(AdapterRow, BaseModelRow.name).join(BaseModelRow, BaseModelRow.id == AdapterRow.base_model_id).order_by(AdapterRow.name)
    ):
        n, latest = stats.get(a.id, (0, None))
        out.append(E.Adapter(a.name, a.domain, base_name, a.description, E.as_utc(a.created_at), n, latest, aliases.get(a.id, {})))
    return out
