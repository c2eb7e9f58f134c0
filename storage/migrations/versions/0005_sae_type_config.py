"""SAE type settings as JSON.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

saes gains `sae_config`, the SAE type's own settings as JSON ({"architecture": "topk", "k": 32,
...}, from `core.sae.registry`), replacing the TopK-only `k` column: each type owns its knobs.
Existing rows keep their k in the JSON. SQLite drops a column by copying the table (batch mode).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

saes = sa.table("saes", sa.column("id", sa.String), sa.column("architecture", sa.String),
                sa.column("k", sa.Integer), sa.column("sae_config", sa.JSON))


def upgrade() -> None:
    op.add_column("saes", sa.Column("sae_config", sa.JSON(), nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(saes.c.id, saes.c.architecture, saes.c.k)).all():
        config = {"architecture": row.architecture} | ({"k": row.k} if row.k else {})
        conn.execute(saes.update().where(saes.c.id == row.id).values(sae_config=config))
    with op.batch_alter_table("saes") as batch:
        batch.alter_column("sae_config", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("k")


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("k", sa.Integer(), nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(saes.c.id, saes.c.sae_config)).all():
        k = (row.sae_config or {}).get("k")
        if isinstance(k, int):
            conn.execute(saes.update().where(saes.c.id == row.id).values(k=k))
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("sae_config")
