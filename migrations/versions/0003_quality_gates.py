"""quality: evaluation cache keys, gate policies, revalidations, drifted flag

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("eval_key", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_evaluations_eval_key"), ["eval_key"], unique=False)
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drifted", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "gate_policies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("max_regression", sa.Float(), nullable=False),
        sa.Column("min_gain", sa.Float(), nullable=False),
        sa.Column("retention", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_gate_policies_adapter_id_adapters")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gate_policies")),
        sa.UniqueConstraint("adapter_id", name=op.f("uq_gate_policies_adapter_id")),
    )
    op.create_table(
        "revalidations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("snapshot_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=100), nullable=True),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("baseline", sa.Float(), nullable=False),
        sa.Column("baseline_snapshot", sa.String(length=250), nullable=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["snapshot_id"], ["dataset_snapshots.id"], name=op.f("fk_revalidations_snapshot_id_dataset_snapshots")),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"], name=op.f("fk_revalidations_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revalidations")),
    )
    with op.batch_alter_table("revalidations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_revalidations_version_id"), ["version_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("revalidations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_revalidations_version_id"))
    op.drop_table("revalidations")
    op.drop_table("gate_policies")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_column("drifted")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluations_eval_key"))
        batch_op.drop_column("eval_key")
