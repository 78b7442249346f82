"""artifacts: removed_at, set when archive or gc deletes a blob's bytes (the record stays)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))
    _mark_retired_blobs()


def _mark_retired_blobs() -> None:
    """A database that went down to 0004 and back has lost its marks: mark every artifact
    that nothing live uses (only archived versions did) as removed, which is what archive
    would have recorded, so `verify` does not report retired bytes as missing and `gc`
    still reclaims any that remain."""
    import json
    from datetime import datetime, timezone

    conn = op.get_bind()
    versions = sa.table("adapter_versions", sa.column("status"), sa.column("artifact_digest"), sa.column("config_digest"))
    snapshots = sa.table("dataset_snapshots", sa.column("files"), sa.column("rows_digest"))
    artifacts = sa.table("artifacts", sa.column("digest"), sa.column("removed_at"))
    live = set()
    for weights, config in conn.execute(sa.select(versions.c.artifact_digest, versions.c.config_digest).where(versions.c.status != "archived")):
        live.update(d for d in (weights, config) if d)
    for files, rows in conn.execute(sa.select(snapshots.c.files, snapshots.c.rows_digest)):
        files = json.loads(files) if isinstance(files, str) else files
        live.update(f["sha256"] for f in files or [])
        live.add(rows)
    retired = [d for (d,) in conn.execute(sa.select(artifacts.c.digest)) if d not in live]
    now = datetime.now(timezone.utc)
    for digest in retired:
        conn.execute(sa.update(artifacts).where(artifacts.c.digest == digest).values(removed_at=now))


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("removed_at")
