"""engine_loads: versions loaded into running serving engines (vLLM) under a name, and when

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_loads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("engine_url", sa.String(length=500), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"], name=op.f("fk_engine_loads_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_engine_loads")),
    )
    op.create_index(op.f("ix_engine_loads_engine_url"), "engine_loads", ["engine_url"], unique=False)
    op.create_index(op.f("ix_engine_loads_created_at"), "engine_loads", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_engine_loads_created_at"), table_name="engine_loads")
    op.drop_index(op.f("ix_engine_loads_engine_url"), table_name="engine_loads")
    op.drop_table("engine_loads")
