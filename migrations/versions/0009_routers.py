"""routers: named, versioned routing rule sets with an append-only history

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routers")),
        sa.UniqueConstraint("name", name=op.f("uq_routers_name")),
    )
    op.create_table(
        "route_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("router_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("rule", sa.String(length=400), nullable=True),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["router_id"], ["routers.id"], name=op.f("fk_route_events_router_id_routers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_route_events")),
        sa.UniqueConstraint("router_id", "version", name=op.f("uq_route_events_router_id_version")),
    )
    with op.batch_alter_table("route_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_route_events_router_id"), ["router_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("route_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_route_events_router_id"))
    op.drop_table("route_events")
    op.drop_table("routers")
