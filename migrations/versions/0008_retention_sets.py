"""bounded retention: retention sets, per-example score cache, retention settings on gates

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retention_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("strata", sa.JSON(), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_retention_sets_adapter_id_adapters")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retention_sets")),
        sa.UniqueConstraint("adapter_id", "version", name=op.f("uq_retention_sets_adapter_id_version")),
    )
    with op.batch_alter_table("retention_sets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_retention_sets_adapter_id"), ["adapter_id"], unique=False)
    op.create_table(
        "example_scores",
        sa.Column("model_key", sa.String(length=64), nullable=False),
        sa.Column("example_sha", sa.String(length=64), nullable=False),
        sa.Column("loss_sum", sa.Float(), nullable=False),
        sa.Column("correct", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model_key", "example_sha", name=op.f("pk_example_scores")),
    )
    with op.batch_alter_table("gate_policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retention_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("retention_seed", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gate_policies", schema=None) as batch_op:
        batch_op.drop_column("retention_seed")
        batch_op.drop_column("retention_size")
    op.drop_table("example_scores")
    with op.batch_alter_table("retention_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_retention_sets_adapter_id"))
    op.drop_table("retention_sets")
