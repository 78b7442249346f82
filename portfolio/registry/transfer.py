"""Moving a registry's artifacts to another store (`portfolio store copy --to s3://...`).

Idempotent and resumable: a blob already in the destination (under its digest, so it is the
same bytes) is skipped, and a blob appears there whole or not at all (an atomic rename, or a
conditional put), so a copy cut off anywhere is finished by running it again. The checkpoints of
runs that may still be resumed travel too. At the end every recorded blob is re-hashed **in the
destination** (streamed), and the copy reports any that is not intact. The source is never
changed: switch to the new store by pointing ``PORTFOLIO_STORE`` (or ``--store``) at it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.registry.models import ArtifactRow, RunRow
from portfolio.store.base import ArtifactStore


@dataclass(frozen=True)
class CopyReport:
    """What a store copy did."""

    destination: str
    copied: int
    skipped: int
    bytes: int
    checkpoints: int
    verified: int
    problems: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return dict(self.__dict__)


def inventory(session: Session) -> tuple[list[tuple[str, int]], set[int]]:
    """(every recorded, not removed blob with its size; runs that may still be resumed)."""
    blobs = [(d, int(s)) for d, s in session.execute(
        sa.select(ArtifactRow.digest, ArtifactRow.size).where(ArtifactRow.removed_at.is_(None)).order_by(ArtifactRow.digest))]
    open_runs = set(session.scalars(sa.select(RunRow.id).where(RunRow.status.in_(["running", "interrupted"]))))
    return blobs, open_runs


def copy_store(source: ArtifactStore, dest: ArtifactStore, blobs: list[tuple[str, int]], open_runs: set[int],
               progress: Callable[[int, int], None] | None = None) -> CopyReport:
    """Copy ``blobs`` and the checkpoints of ``open_runs`` from ``source`` to ``dest``, then
    re-hash every blob in ``dest``."""
    if dest.url == source.url:
        raise InvalidState(f"--to {dest.url} is the store in use; name another folder or bucket")
    checkpoint = source.CHECKPOINT_FILE
    copied = skipped = moved = 0
    for done, (digest, size) in enumerate(blobs, start=1):
        if dest.exists(digest):
            skipped += 1
        else:
            dest.commit(dest.stage(source.verified_path(digest, f"artifact {digest[:12]}")))
            copied += 1
            moved += size
        if progress:
            progress(done, len(blobs))
    checkpoints = 0
    for run_id in sorted(set(source.work_runs()) & open_runs):
        source.pull_work(run_id, checkpoint)
        path = source.work_dir(run_id) / checkpoint
        if path.is_file():
            target = dest.work_dir(run_id) / checkpoint
            if target != path:
                target.write_bytes(path.read_bytes())
            dest.push_work(run_id, target)
            checkpoints += 1
    problems = []
    for digest, _ in blobs:
        state = dest.check(digest)
        if state != "ok":
            problems.append({"digest": digest, "state": state})
    return CopyReport(dest.url, copied, skipped, moved, checkpoints, len(blobs) - len(problems), problems)
