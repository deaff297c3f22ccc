"""Status blocks: each request row keeps the block of the chain event (or receipt) that last
set its status, so that when a reorganisation takes that block the status goes back to what
the older blocks say, and the blocks read again set it anew (issue 20).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        # Null on rows whose status the node set itself, and on rows older than this revision.
        batch.add_column(sa.Column("status_block", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("status_block")
