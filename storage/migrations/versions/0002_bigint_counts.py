"""Token and parameter counts as BIGINT on PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

models.n_params (7e9 for a 7B model), datasets.tokens, activations.tokens and features.n_fired
can pass 2**31, PostgreSQL's INTEGER range. SQLite's INTEGER already stores 64-bit values, so
this revision changes nothing there (no table copy).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = [("models", "n_params"), ("datasets", "tokens"), ("activations", "tokens"), ("features", "n_fired")]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
