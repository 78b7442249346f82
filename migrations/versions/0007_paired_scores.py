"""paired scoring: per-example scores on evaluations, the gate's confidence level

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("per_example", sa.JSON(), nullable=True))
    with op.batch_alter_table("gate_policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gate_policies", schema=None) as batch_op:
        batch_op.drop_column("confidence")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_column("per_example")
