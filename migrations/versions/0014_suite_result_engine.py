"""suite_results.engine: which serving engine produced a result ("" for portfolio's reference
model), so results on llama.cpp sit beside, and never replace, the reference ones

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("suite_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("engine", sa.String(length=100), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("suite_results", schema=None) as batch_op:
        batch_op.drop_column("engine")
