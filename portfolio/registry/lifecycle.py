"""Retiring versions and reclaiming bytes: archive and gc, as session functions.

Records are never deleted: an archived version keeps its row, lineage edges, data edges,
evaluations and run, so `lineage` still traces through it to the dataset bytes. Only blobs
go, and only when nothing live needs them:

- a blob is **live** if a version that is not archived uses it (weights or config; identical
  bytes are shared between versions) or a dataset snapshot does (snapshots are never retired,
  only purged after a revocation: `registry.governance`);
- a blob's bytes are deleted while its `artifacts` row is locked, then the row is marked
  ``removed_at`` in the same transaction. A writer that reuses the same bytes locks the row
  too and writes the bytes back (`Registry._write`), so a concurrent register never ends up
  pointing at a deleted blob. If the commit fails after the delete, the blob belonged to
  nothing live anyway, and `gc` finishes the bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.registry import db, queries
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    ArtifactRow,
    BaseModelRow,
    DatasetSnapshotRow,
    RunRow,
    SuiteSnapshotRow,
    utcnow,
)
from portfolio.registry.references import delete_unless_live, live_digests, live_references
from portfolio.store.base import ArtifactStore
from portfolio.store.digests import sha256_file

GC_GRACE_SECONDS = 3600.0  # unrecorded blobs younger than this may belong to a write in flight


@dataclass(frozen=True)
class ArchiveResult:
    """What archiving a version did to the store."""

    version: Any
    removed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return {"version": self.version.to_dict(), "removed": self.removed, "kept": self.kept}


@dataclass(frozen=True)
class GcReport:
    """What `gc` found (and, unless a dry run, removed)."""

    items: list[dict[str, Any]]
    dry_run: bool

    @property
    def bytes(self) -> int:
        """Total size of what was (or would be) removed."""
        return sum(i["size"] for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return {"dry_run": self.dry_run, "bytes": self.bytes, "items": self.items}


def mark_archived(session: Session, ref: str, reason: str | None, force: bool) -> AdapterVersionRow:
    """Move a version to ``archived`` after checking nothing live depends on it: no alias
    points at it, no live stack has it as a part, and it was deprecated first (unless
    ``force``)."""
    row = queries.version_row(session, ref)
    name = session.get(AdapterRow, row.adapter_id).name
    label = f"{name}@{row.version}"
    if row.status == "archived":
        raise InvalidState(f"{label} is already archived")
    aliases = session.scalars(sa.select(AliasRow.name).where(AliasRow.version_id == row.id)).all()
    if aliases:
        raise InvalidState(
            f"{label} is served as {name}@{aliases[0]}; move the alias first "
            f"(`portfolio alias set {name} {aliases[0]} V` or `portfolio rollback {name} --alias {aliases[0]}`)"
        )
    for stack, components in _live_stacks(session):
        if label in components:
            raise InvalidState(f"{label} is part of the live stack {stack}; archive {stack} first")
    if row.status != "deprecated" and not force:
        raise InvalidState(
            f"{label} is {row.status}; deprecate it first (`portfolio deprecate {label} --reason TEXT "
            "[--successor REF]`) or pass --force"
        )
    row.status = "archived"
    if reason:
        row.status_reason = f"{row.status_reason}; archived: {reason}" if row.status_reason else reason
    session.flush()
    return row


def _live_stacks(session: Session) -> list[tuple[str, set[str]]]:
    rows = session.execute(
        sa.select(AdapterRow.name, AdapterVersionRow.version, AdapterVersionRow.lora_config)
        .join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id)
        .where(AdapterVersionRow.kind == "stack", AdapterVersionRow.status != "archived")
    ).all()
    return [(f"{n}@{v}", {c["ref"] for c in (cfg or {}).get("components", [])}) for n, v, cfg in rows]


def version_digests(row: AdapterVersionRow) -> list[str]:
    """The blobs of one version."""
    return [d for d in (row.artifact_digest, row.config_digest) if d]


def remove_unreferenced(session: Session, store: ArtifactStore, digests: list[str]) -> tuple[list[dict], list[dict]]:
    """Delete the bytes of each digest nothing live needs, marking its row removed;
    return (removed, kept) with sizes and, for kept ones, who still needs them."""
    todo = [d for d in digests if (a := session.get(ArtifactRow, d)) is not None and a.removed_at is None]
    return delete_unless_live(session, store, todo)


def find_garbage(session: Session, store: ArtifactStore, min_age: float) -> list[dict[str, Any]]:
    """Everything `gc` would remove: recorded blobs nothing live uses, blobs no row records
    (a writer killed between storing and recording) older than ``min_age`` seconds, stale
    temporary files, and work folders of runs that finished (checkpoints of interrupted runs
    stay: they are what `train --resume` continues from)."""
    live = live_digests(session)
    recorded = {d: (k, s, r) for d, k, s, r in session.execute(sa.select(ArtifactRow.digest, ArtifactRow.kind, ArtifactRow.size, ArtifactRow.removed_at))}
    items: list[dict[str, Any]] = []
    for digest, (kind, size, removed_at) in sorted(recorded.items()):
        present = store.exists(digest)
        if digest in live or (removed_at is not None and not present):
            continue
        items.append({"type": "artifact", "digest": digest, "kind": kind, "size": size if present else 0,
                      "reason": "used only by archived versions" if present else "bytes already gone; record not yet marked"})
    for digest in store.digests():
        if digest not in recorded and store.age_seconds(digest) >= min_age:
            items.append({"type": "unrecorded", "digest": digest, "kind": "-", "size": store.size(digest),
                          "reason": "no record (left by an interrupted write)"})
    for tmp in store.stale_temp_files(min_age):
        items.append({"type": "temp", "digest": str(tmp), "kind": "-", "size": tmp.stat().st_size, "reason": "temporary file of an interrupted write"})
    for upload in store.stale_uploads(min_age):
        items.append({"type": "upload", "digest": upload["key"], "kind": "multipart", "size": 0, "upload": upload,
                      "reason": "an upload cut off midway (its parts are held by the server)"})
    work = store.work_runs()
    if work:
        finished = dict(session.execute(sa.select(RunRow.id, RunRow.status).where(RunRow.status.in_(["succeeded", "failed"]))).all())
        for run_id in work:
            if run_id in finished:
                items.append({"type": "run-workdir", "digest": f"{store.url}/work/runs/{run_id}", "run_id": run_id, "kind": "checkpoints", "size": store.work_bytes(run_id),
                              "reason": f"run {run_id} {finished[run_id]}"})
    return items


def collect(session: Session, store: ArtifactStore, items: list[dict[str, Any]], min_age: float) -> None:
    """Remove what `find_garbage` listed, re-checking each item first: a recorded artifact
    under its row lock, an unrecorded blob by its age (a writer reusing it freshens it)."""
    delete_unless_live(session, store, [i["digest"] for i in items if i["type"] == "artifact"])
    for item in items:  # recorded artifacts are done above
        if item["type"] == "unrecorded":
            # Claim the digest by inserting its row (it waits for a writer recording the same
            # bytes and then finds the row taken); the claim goes again before the commit.
            if store.age_seconds(item["digest"]) >= min_age and db.insert_ignore(
                session, ArtifactRow.__table__, {"digest": item["digest"], "kind": "claim", "size": 0, "created_at": utcnow()}
            ):
                store.delete(item["digest"])
                session.execute(sa.delete(ArtifactRow).where(ArtifactRow.digest == item["digest"]))
        elif item["type"] == "temp":
            Path(item["digest"]).unlink(missing_ok=True)
        elif item["type"] == "upload":
            store.abort_upload(item["upload"])
        elif item["type"] == "run-workdir":
            item["size"] = store.remove_work(item["run_id"])
    session.flush()


def verify(session: Session, store: ArtifactStore):
    """Re-hash every recorded artifact not removed on purpose; report missing or corrupt ones
    with what uses them."""
    from portfolio.registry.entities import VerifyReport

    # every blob still recorded as present, and every blob a live record names, whatever its
    # artifacts row says (a row marked removed, or none at all, under a live reference is a loss)
    recorded = session.execute(sa.select(ArtifactRow.digest, ArtifactRow.kind, ArtifactRow.removed_at)).all()
    live = live_references(session)
    kinds = {digest: kind for digest, kind, removed_at in recorded if removed_at is None or digest in live}
    for digest in live:
        kinds.setdefault(digest, "unrecorded")
    users: dict[str, list[str]] | None = None  # a scan of every record: only when something is wrong
    problems = []
    for digest in sorted(kinds):
        state = store.check(digest)
        if state != "ok":
            users = artifact_users(session) if users is None else users
            problems.append({"digest": digest, "kind": kinds[digest], "state": state,
                             "used_by": ", ".join(live.get(digest) or users.get(digest, [])) or "-"})
    checked = len(kinds)
    for base in session.scalars(sa.select(BaseModelRow).order_by(BaseModelRow.name)):
        for f in base.files:
            checked += 1
            state = _base_file_state(base.source, f)
            if state != "ok":
                problems.append({"digest": f["sha256"], "kind": "base_weights", "state": state, "used_by": f"base {base.name} ({f['name']})"})
    return VerifyReport(checked=checked, ok=checked - len(problems), problems=problems)


def _base_file_state(source: str, f: dict[str, Any]) -> str:
    """Re-hash one weight file of a registered base: ``ok``, ``missing`` or ``corrupt``."""
    from portfolio.basemodel import resolve_source
    from portfolio.errors import BaseModelNotFound

    try:
        path = resolve_source(source) / f["name"]
    except BaseModelNotFound:
        return "missing"
    if not path.is_file():
        return "missing"
    return "ok" if sha256_file(path) == f["sha256"] else "corrupt"


def artifact_users(session: Session) -> dict[str, list[str]]:
    """digest -> the versions and snapshots that use it (``NAME@V``)."""
    users: dict[str, list[str]] = {}
    for name, ver, weights, cfg in session.execute(
        sa.select(AdapterRow.name, AdapterVersionRow.version, AdapterVersionRow.artifact_digest, AdapterVersionRow.config_digest).join(
            AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id
        )
    ):
        for digest in (weights, cfg):
            if digest:
                users.setdefault(digest, []).append(f"{name}@{ver}")
    for name, ver, files, rows in session.execute(
        sa.select(DatasetSnapshotRow.name, DatasetSnapshotRow.version, DatasetSnapshotRow.files, DatasetSnapshotRow.rows_digest)
    ):
        for digest in [f["sha256"] for f in files] + [rows]:
            users.setdefault(digest, []).append(f"{name}@{ver}")
    for name, ver, digest in session.execute(sa.select(SuiteSnapshotRow.name, SuiteSnapshotRow.version, SuiteSnapshotRow.sha256)):
        users.setdefault(digest, []).append(f"suite {name}@{ver}")
    return users
