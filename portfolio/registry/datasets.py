"""Dataset snapshots: files registered as immutable, content-addressed versions, their
rows validated and normalised once and kept in the store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.data import formats
from portfolio.registry import db, queries, taint
from portfolio.registry import entities as E
from portfolio.registry.models import DatasetSnapshotRow
from portfolio.registry.namespace import Namespace
from portfolio.registry.refs import check_length, check_name
from portfolio.registry.taint import DataRevoked

ROWS_CACHE_LIMIT = 500_000  # parsed snapshot rows kept in memory per process


class Datasets(Namespace):
    """``reg.data``: immutable dataset snapshots and their rows (behind `portfolio data add/list/show`)."""

    def __init__(self, registry: Any):
        super().__init__(registry)
        self._rows_cache: dict[str, list[dict[str, Any]]] = {}

    def forget_rows(self) -> None:
        """Drop the in-memory rows (a purge removed some snapshot's bytes)."""
        self._rows_cache.clear()

    def add(
        self,
        name: str,
        files: list[str | os.PathLike],
        domain: str,
        source: str | None = None,
        license: str | None = None,
    ) -> tuple[E.DatasetSnapshot, bool]:
        """Register files as the next immutable snapshot of dataset ``name``. Identical
        content returns the existing snapshot. Returns (snapshot, created)."""
        check_name(name, "dataset name")
        check_name(domain, "domain")
        check_length(source, 2000, "--source")
        check_length(license, 200, "--license")
        # rows are validated and normalised in one streaming pass into a temporary file, so a
        # large file is never held in memory whole
        with tempfile.NamedTemporaryFile(prefix="portfolio-rows-", suffix=".jsonl") as rows_file:
            writer = formats.RowWriter(rows_file)
            parsed, fmt = formats.parse_files(files, writer)
            rows_file.flush()
            sha = formats.snapshot_sha256(parsed)
            with self._write() as (session, put):
                db.lock_name(session, "dataset", name)
                existing = session.scalar(
                    sa.select(DatasetSnapshotRow).where(DatasetSnapshotRow.name == name, DatasetSnapshotRow.sha256 == sha)
                )
                if existing is not None:
                    snapshot = queries.to_snapshot(existing)
                    if snapshot.revoked:
                        raise DataRevoked(f"these bytes are {snapshot.ref}, revoked on {snapshot.revoked_at:%Y-%m-%d} by "
                                          f"{snapshot.revoked_by} ({snapshot.revoke_reason}); revoked data is not registered again")
                    return snapshot, False
                for pf in parsed:
                    put(pf.path, "dataset_file")
                rows_digest = put(rows_file.name, "dataset_rows")
                latest = session.scalar(sa.select(sa.func.max(DatasetSnapshotRow.version)).where(DatasetSnapshotRow.name == name))
                row = DatasetSnapshotRow(
                    name=name,
                    version=(latest or 0) + 1,
                    domain=domain,
                    sha256=sha,
                    format=fmt,
                    row_count=writer.n_rows,
                    n_bytes=sum(pf.size for pf in parsed),
                    files=[{"name": pf.path.name, "sha256": pf.sha256, "size": pf.size} for pf in parsed],
                    rows_digest=rows_digest,
                    source_uri=source or _default_source(parsed),
                    license=license,
                )
                session.add(row)
                session.flush()
                return queries.to_snapshot(row), True

    def get(self, ref: str) -> E.DatasetSnapshot:
        """The snapshot ``NAME@V`` (``NAME`` alone: the latest)."""
        with self._read() as session:
            return queries.to_snapshot(queries.snapshot_row(session, ref))

    def get_many(self, refs: list[str]) -> list[E.DatasetSnapshot]:
        """The snapshots ``NAME@V`` of ``refs``, in order (fewer queries than one `get_snapshot` each)."""
        with self._read() as session:
            return _snapshots(session, queries.snapshot_rows_many(session, list(refs)))

    def list(self, name: str | None = None, domain: str | None = None) -> list[E.DatasetSnapshot]:
        """Snapshots, optionally of one dataset or one domain."""
        query = sa.select(DatasetSnapshotRow).order_by(DatasetSnapshotRow.name, DatasetSnapshotRow.version)
        if name:
            query = query.where(DatasetSnapshotRow.name == name)
        if domain:
            query = query.where(DatasetSnapshotRow.domain == domain)
        with self._read() as session:
            return _snapshots(session, session.scalars(query).all())

    def rows(self, ref: str | E.DatasetSnapshot) -> list[dict[str, Any]]:
        """The snapshot's rows exactly as registered: ``{"row", "sha", "data"}`` each.

        Kept in memory by digest (bounded, `ROWS_CACHE_LIMIT` rows): a long-lived worker reads
        every earlier snapshot each cycle (replay, the retention set), and their bytes never
        change. The list is shared: read it, never modify it."""
        snapshot = ref if isinstance(ref, E.DatasetSnapshot) else self.get(ref)
        if snapshot.purged:
            raise DataRevoked(f"{snapshot.ref} was purged on {snapshot.purged_at:%Y-%m-%d} (revoked: {snapshot.revoke_reason}); "
                              f"its rows are gone, only its sha256 {snapshot.sha256[:12]} and metadata remain")
        rows = self._rows_cache.pop(snapshot.rows_digest, None)
        if rows is None:
            rows = formats.read_rows(self.store.read_bytes(snapshot.rows_digest, f"the rows of {snapshot.ref}"))
        self._rows_cache[snapshot.rows_digest] = rows  # most recently used last
        while sum(len(r) for r in self._rows_cache.values()) > ROWS_CACHE_LIMIT and len(self._rows_cache) > 1:
            self._rows_cache.pop(next(iter(self._rows_cache)))
        return rows


def _snapshots(session: Session, rows: list[DatasetSnapshotRow]) -> list[E.DatasetSnapshot]:
    """Rows -> entities, their data events read in one query."""
    events = taint.data_events(session, [r.id for r in rows])
    return [queries.to_snapshot(r, events.get(r.id, {})) for r in rows]


def _default_source(parsed: list[formats.ParsedFile]) -> str:
    """Where the files came from when no --source is given: the file, or their folder."""
    where = Path(parsed[0].path).resolve()
    return str(where if len(parsed) == 1 else where.parent)[:2000]
