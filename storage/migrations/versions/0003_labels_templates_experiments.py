"""Model quantization; feature labels and analysis; templates; steering experiments.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

models gains the quantization every job loads it with; saes the dataset discovery ran on; features gains the label's category, description and source, and a JSON `analysis`; new tables
`templates` (saved forms and prompt sets, keyed by kind and name) and `experiments` (saved
steering runs). Adding columns with server defaults needs no table copy on SQLite.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("models", sa.Column("quantization", sa.String(8), nullable=False, server_default="none"))
    op.add_column("saes", sa.Column("features_dataset_id", sa.String(64), nullable=True))
    op.add_column("features", sa.Column("category", sa.String(32), nullable=False, server_default=""))
    op.add_column("features", sa.Column("description", sa.Text(), nullable=False, server_default=""))
    op.add_column("features", sa.Column("label_source", sa.String(128), nullable=False, server_default=""))
    op.add_column("features", sa.Column("analysis", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "templates",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("sae_id", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_experiments_sae_id", "experiments", ["sae_id"])


def downgrade() -> None:
    op.drop_index("ix_experiments_sae_id", "experiments")
    op.drop_table("experiments")
    op.drop_table("templates")
    with op.batch_alter_table("features") as batch:
        for column in ("analysis", "label_source", "description", "category"):
            batch.drop_column(column)
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("features_dataset_id")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("quantization")
