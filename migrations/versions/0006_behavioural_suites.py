"""behavioural suites: content-hashed suite snapshots, per-model suite results, suite gate criteria

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("n_cases", sa.Integer(), nullable=False),
        sa.Column("slices", sa.JSON(), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suites")),
        sa.UniqueConstraint("name", "sha256", name=op.f("uq_suites_name_sha256")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_suites_name_version")),
    )
    with op.batch_alter_table("suites", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_suites_name"), ["name"], unique=False)
    op.create_table(
        "suite_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("suite_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("base_model_id", sa.Integer(), nullable=True),
        sa.Column("eval_key", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("cases", sa.JSON(), nullable=False),
        sa.Column("code_version", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["base_model_id"], ["base_models.id"], name=op.f("fk_suite_results_base_model_id_base_models")),
        sa.ForeignKeyConstraint(["suite_id"], ["suites.id"], name=op.f("fk_suite_results_suite_id_suites")),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"], name=op.f("fk_suite_results_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suite_results")),
    )
    with op.batch_alter_table("suite_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_suite_results_eval_key"), ["eval_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_suite_results_suite_id"), ["suite_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_suite_results_version_id"), ["version_id"], unique=False)
    with op.batch_alter_table("gate_policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suite_criteria", sa.JSON(), nullable=True))
    with op.batch_alter_table("revalidations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suite_id", sa.Integer(), nullable=True))
        batch_op.alter_column("snapshot_id", existing_type=sa.Integer(), nullable=True)
        batch_op.create_foreign_key(batch_op.f("fk_revalidations_suite_id_suites"), "suites", ["suite_id"], ["id"])


def downgrade() -> None:
    op.execute("DELETE FROM revalidations WHERE snapshot_id IS NULL")  # suite revalidations have no place in 0005
    with op.batch_alter_table("revalidations", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_revalidations_suite_id_suites"), type_="foreignkey")
        batch_op.alter_column("snapshot_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("suite_id")
    with op.batch_alter_table("gate_policies", schema=None) as batch_op:
        batch_op.drop_column("suite_criteria")
    with op.batch_alter_table("suite_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_suite_results_version_id"))
        batch_op.drop_index(batch_op.f("ix_suite_results_suite_id"))
        batch_op.drop_index(batch_op.f("ix_suite_results_eval_key"))
    op.drop_table("suite_results")
    with op.batch_alter_table("suites", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_suites_name"))
    op.drop_table("suites")
