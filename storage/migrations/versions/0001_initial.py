"""Initial schema: the tables `Base.metadata.create_all` made before migrations existed.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

A registry created by `create_all` (tables, no alembic_version) is stamped at this revision
by `storage.migrate`, so this file must describe those tables exactly. sa.JSON is JSON on
PostgreSQL and TEXT holding JSON on SQLite; sa.DateTime is a naive UTC timestamp on both.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('model_id', sa.String(length=64), nullable=True),
    sa.Column('dataset_id', sa.String(length=64), nullable=True),
    sa.Column('sae_id', sa.String(length=64), nullable=True),
    sa.Column('step', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)

    op.create_table('models',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('architecture', sa.String(length=64), nullable=False),
    sa.Column('n_layers', sa.Integer(), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('n_params', sa.Integer(), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('saes',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('model_id', sa.String(length=64), nullable=True),
    sa.Column('hook_name', sa.String(length=128), nullable=False),
    sa.Column('architecture', sa.String(length=32), nullable=False),
    sa.Column('d_in', sa.Integer(), nullable=False),
    sa.Column('d_sae', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('training_job_id', sa.String(length=64), nullable=True),
    sa.Column('activation_id', sa.String(length=64), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('history', sa.JSON(), nullable=False),
    sa.Column('features_path', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_saes_model_id'), ['model_id'], unique=False)

    op.create_table('datasets',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('text_column', sa.String(length=128), nullable=False),
    sa.Column('model_id', sa.String(length=64), nullable=False),
    sa.Column('context_length', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('documents', sa.Integer(), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('stats', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('features',
    sa.Column('sae_id', sa.String(length=64), nullable=False),
    sa.Column('latent', sa.Integer(), nullable=False),
    sa.Column('n_fired', sa.Integer(), nullable=False),
    sa.Column('frequency', sa.Float(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('mean_act', sa.Float(), nullable=False),
    sa.Column('top_tokens', sa.JSON(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ),
    sa.PrimaryKeyConstraint('sae_id', 'latent')
    )
    op.create_table('activations',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=64), nullable=False),
    sa.Column('dataset_id', sa.String(length=64), nullable=False),
    sa.Column('hook_name', sa.String(length=128), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('stats', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('activations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_activations_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('activations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_activations_job_id'))

    op.drop_table('activations')
    op.drop_table('features')
    op.drop_table('datasets')
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_saes_model_id'))

    op.drop_table('saes')
    op.drop_table('models')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_model_id'))

    op.drop_table('jobs')
