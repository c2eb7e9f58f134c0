"""Job priorities.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

jobs gains `priority` (higher runs first among queued jobs; ties in submission order). Adding a
column with a server default needs no table copy on SQLite.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "priority")
