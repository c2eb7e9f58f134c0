"""Job attempts (fencing).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

jobs gains `attempt`: a fresh token each time a run of the job starts or the job changes hands
(started, requeued, cancelled, marked interrupted by a restarted job manager). A run's registry
writes are accepted only while the job still carries its token (storage.fencing), so a job
manager or worker of a dead Ray head cannot write. Adding a column with a server default needs
no table copy on SQLite.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attempt", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempt")
