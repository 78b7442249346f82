"""request log: served requests per (version, router, rule, hour)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("router", sa.String(length=100), nullable=False),
        sa.Column("rule", sa.String(length=400), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"], name=op.f("fk_request_counts_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_counts")),
        sa.UniqueConstraint("version_id", "router", "rule", "hour", name=op.f("uq_request_counts_version_id_router_rule_hour")),
    )
    with op.batch_alter_table("request_counts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_request_counts_version_id"), ["version_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("request_counts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_request_counts_version_id"))
    op.drop_table("request_counts")
