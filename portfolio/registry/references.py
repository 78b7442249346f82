"""Which blobs live records still need, and deleting the rest safely.

Every kind of record that names a blob is read in `live_references`, so purge, archive, gc
and verify agree on what must stay; `delete_unless_live` is the one way bytes are deleted
(under the digests' row locks, liveness read after the locks: docs/reliability.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    ArtifactRow,
    DataEventRow,
    DatasetSnapshotRow,
    SuiteSnapshotRow,
    utcnow,
)
from portfolio.store.base import ArtifactStore


def live_references(session: Session, exclude_snapshots: set[int] | frozenset[int] = frozenset()) -> dict[str, list[str]]:
    """digest -> every live record that needs its bytes (``NAME@V`` of a version that is not
    archived, weights or config; ``dataset NAME@V`` of a snapshot not purged, files or rows;
    ``suite NAME@V``), leaving out the snapshots in ``exclude_snapshots``. Every kind of
    record that names a blob is read here, so purge, archive, gc and verify agree on what
    must stay."""
    refs: dict[str, list[str]] = {}
    for name, ver, weights, config in session.execute(
        sa.select(AdapterRow.name, AdapterVersionRow.version, AdapterVersionRow.artifact_digest, AdapterVersionRow.config_digest)
        .join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id).where(AdapterVersionRow.status != "archived")
    ):
        for digest in dict.fromkeys(d for d in (weights, config) if d):
            refs.setdefault(digest, []).append(f"{name}@{ver}")
    # snapshots are never retired, except by purge (`registry.governance`), which gives their bytes up
    purged = sa.select(DataEventRow.snapshot_id).where(DataEventRow.action == "purge")
    for sid, name, ver, files, rows_digest in session.execute(
        sa.select(DatasetSnapshotRow.id, DatasetSnapshotRow.name, DatasetSnapshotRow.version, DatasetSnapshotRow.files,
                  DatasetSnapshotRow.rows_digest).where(DatasetSnapshotRow.id.notin_(purged))
    ):
        if sid in exclude_snapshots:
            continue
        for digest in dict.fromkeys([f["sha256"] for f in files] + [rows_digest]):
            refs.setdefault(digest, []).append(f"dataset {name}@{ver}")
    for name, ver, digest in session.execute(sa.select(SuiteSnapshotRow.name, SuiteSnapshotRow.version, SuiteSnapshotRow.sha256)):
        refs.setdefault(digest, []).append(f"suite {name}@{ver}")  # suites are never retired either
    return refs


def live_digests(session: Session) -> set[str]:
    """Blobs something live still needs (see `live_references`)."""
    return set(live_references(session))


def delete_unless_live(session: Session, store: ArtifactStore, digests: list[str]) -> tuple[list[dict], list[dict]]:
    """Delete the bytes of each digest that nothing live needs, under its ``artifacts`` row
    lock, marking the row removed; return (removed, kept), kept ones with who needs them.

    Every row is locked first (in digest order, so two deleters never deadlock), and only
    then is liveness read: a writer that records one of these digests locks its row before
    it commits, so it has either committed (and is seen here) or waits until these deletes
    are committed and then writes the bytes back. Reading liveness before the locks would
    miss a writer that committed in between."""
    arts = {}
    for digest in sorted(set(digests)):
        art = session.get(ArtifactRow, digest, with_for_update=True, populate_existing=True)
        if art is not None:
            arts[digest] = art
    live = live_references(session)
    removed, kept = [], []
    for digest in dict.fromkeys(digests):
        art = arts.get(digest)
        if art is None:
            continue
        if digest in live:
            kept.append({"digest": digest, "kind": art.kind, "size": art.size, "needed_by": ", ".join(live[digest])})
            continue
        store.delete(digest)
        art.removed_at = art.removed_at or utcnow()
        removed.append({"digest": digest, "kind": art.kind, "size": art.size, "reason": "no live record uses it"})
    session.flush()
    return removed, kept
