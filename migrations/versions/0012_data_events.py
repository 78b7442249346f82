"""data governance: append-only revocations and purges of dataset snapshots

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("snapshot_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["snapshot_id"], ["dataset_snapshots.id"], name=op.f("fk_data_events_snapshot_id_dataset_snapshots")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_events")),
        sa.UniqueConstraint("snapshot_id", "action", name=op.f("uq_data_events_snapshot_id_action")),
    )
    with op.batch_alter_table("data_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_data_events_snapshot_id"), ["snapshot_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("data_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_data_events_snapshot_id"))
    op.drop_table("data_events")
