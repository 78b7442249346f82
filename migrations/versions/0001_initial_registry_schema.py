"""initial registry schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 06:38:42.974275
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('artifacts',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_artifacts'))
    )
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('model_id', sa.String(length=500), nullable=False),
    sa.Column('source', sa.String(length=1000), nullable=False),
    sa.Column('gguf_file', sa.String(length=500), nullable=True),
    sa.Column('architecture', sa.String(length=200), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('modules', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_models')),
    sa.UniqueConstraint('name', name=op.f('uq_base_models_name'))
    )
    op.create_table('dataset_snapshots',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('domain', sa.String(length=200), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('format', sa.String(length=40), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('n_bytes', sa.BigInteger(), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('rows_digest', sa.String(length=64), nullable=False),
    sa.Column('source_uri', sa.String(length=2000), nullable=True),
    sa.Column('license', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dataset_snapshots')),
    sa.UniqueConstraint('name', 'sha256', name=op.f('uq_dataset_snapshots_name_sha256')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_dataset_snapshots_name_version'))
    )
    with op.batch_alter_table('dataset_snapshots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_snapshots_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_dataset_snapshots_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_dataset_snapshots_sha256'), ['sha256'], unique=False)

    op.create_table('adapters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('domain', sa.String(length=200), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_adapters_base_model_id_base_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters')),
    sa.UniqueConstraint('name', name=op.f('uq_adapters_name'))
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_domain'), ['domain'], unique=False)

    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=40), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=True),
    sa.Column('packages', sa.JSON(), nullable=False),
    sa.Column('code_version', sa.String(length=100), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_runs_adapter_id_adapters')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_status'), ['status'], unique=False)

    op.create_table('adapter_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('successor_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('artifact_digest', sa.String(length=64), nullable=True),
    sa.Column('config_digest', sa.String(length=64), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('target_modules', sa.JSON(), nullable=False),
    sa.Column('lora_config', sa.JSON(), nullable=False),
    sa.Column('n_params', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_versions_adapter_id_adapters')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_adapter_versions_run_id_runs')),
    sa.ForeignKeyConstraint(['successor_id'], ['adapter_versions.id'], name=op.f('fk_adapter_versions_successor_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_versions')),
    sa.UniqueConstraint('adapter_id', 'version', name=op.f('uq_adapter_versions_adapter_id_version'))
    )
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_versions_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_versions_artifact_digest'), ['artifact_digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_versions_status'), ['status'], unique=False)

    op.create_table('alias_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('alias', sa.String(length=100), nullable=False),
    sa.Column('from_version_id', sa.Integer(), nullable=True),
    sa.Column('to_version_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=20), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_alias_events_adapter_id_adapters')),
    sa.ForeignKeyConstraint(['from_version_id'], ['adapter_versions.id'], name=op.f('fk_alias_events_from_version_id_adapter_versions')),
    sa.ForeignKeyConstraint(['to_version_id'], ['adapter_versions.id'], name=op.f('fk_alias_events_to_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_events'))
    )
    with op.batch_alter_table('alias_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alias_events_adapter_id'), ['adapter_id'], unique=False)

    op.create_table('aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_aliases_adapter_id_adapters')),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_aliases_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('adapter_id', 'name', name=op.f('uq_aliases_adapter_id_name'))
    )
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_aliases_version_id'), ['version_id'], unique=False)

    op.create_table('data_edges',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('snapshot_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('row_ids', sa.JSON(), nullable=True),
    sa.Column('n_rows', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['snapshot_id'], ['dataset_snapshots.id'], name=op.f('fk_data_edges_snapshot_id_dataset_snapshots')),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_data_edges_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_data_edges')),
    sa.UniqueConstraint('version_id', 'snapshot_id', 'role', name=op.f('uq_data_edges_version_id_snapshot_id_role'))
    )
    with op.batch_alter_table('data_edges', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_data_edges_snapshot_id'), ['snapshot_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_edges_version_id'), ['version_id'], unique=False)

    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.Column('base_model_id', sa.Integer(), nullable=True),
    sa.Column('snapshot_id', sa.Integer(), nullable=False),
    sa.Column('metric', sa.String(length=100), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=True),
    sa.Column('row_ids', sa.JSON(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('code_version', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_evaluations_base_model_id_base_models')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_evaluations_run_id_runs')),
    sa.ForeignKeyConstraint(['snapshot_id'], ['dataset_snapshots.id'], name=op.f('fk_evaluations_snapshot_id_dataset_snapshots')),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_evaluations_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations'))
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluations_snapshot_id'), ['snapshot_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_version_id'), ['version_id'], unique=False)

    op.create_table('lineage_edges',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=False),
    sa.Column('relation', sa.String(length=20), nullable=False),
    sa.Column('recipe', sa.JSON(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['child_id'], ['adapter_versions.id'], name=op.f('fk_lineage_edges_child_id_adapter_versions')),
    sa.ForeignKeyConstraint(['parent_id'], ['adapter_versions.id'], name=op.f('fk_lineage_edges_parent_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lineage_edges')),
    sa.UniqueConstraint('child_id', 'parent_id', 'relation', name=op.f('uq_lineage_edges_child_id_parent_id_relation'))
    )
    with op.batch_alter_table('lineage_edges', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lineage_edges_child_id'), ['child_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lineage_edges_parent_id'), ['parent_id'], unique=False)

    op.create_table('version_tags',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('value', sa.String(length=1000), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_version_tags_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_version_tags')),
    sa.UniqueConstraint('version_id', 'key', name=op.f('uq_version_tags_version_id_key'))
    )
    with op.batch_alter_table('version_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_version_tags_key'), ['key'], unique=False)
        batch_op.create_index(batch_op.f('ix_version_tags_version_id'), ['version_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('version_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_version_tags_version_id'))
        batch_op.drop_index(batch_op.f('ix_version_tags_key'))

    op.drop_table('version_tags')
    with op.batch_alter_table('lineage_edges', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lineage_edges_parent_id'))
        batch_op.drop_index(batch_op.f('ix_lineage_edges_child_id'))

    op.drop_table('lineage_edges')
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_version_id'))
        batch_op.drop_index(batch_op.f('ix_evaluations_snapshot_id'))

    op.drop_table('evaluations')
    with op.batch_alter_table('data_edges', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_data_edges_version_id'))
        batch_op.drop_index(batch_op.f('ix_data_edges_snapshot_id'))

    op.drop_table('data_edges')
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_aliases_version_id'))

    op.drop_table('aliases')
    with op.batch_alter_table('alias_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alias_events_adapter_id'))

    op.drop_table('alias_events')
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_versions_status'))
        batch_op.drop_index(batch_op.f('ix_adapter_versions_artifact_digest'))
        batch_op.drop_index(batch_op.f('ix_adapter_versions_adapter_id'))

    op.drop_table('adapter_versions')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_status'))
        batch_op.drop_index(batch_op.f('ix_runs_adapter_id'))

    op.drop_table('runs')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapters_domain'))

    op.drop_table('adapters')
    with op.batch_alter_table('dataset_snapshots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_snapshots_sha256'))
        batch_op.drop_index(batch_op.f('ix_dataset_snapshots_name'))
        batch_op.drop_index(batch_op.f('ix_dataset_snapshots_domain'))

    op.drop_table('dataset_snapshots')
    op.drop_table('base_models')
    op.drop_table('artifacts')
