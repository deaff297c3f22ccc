"""Block hashes: each request and claim row keeps the hash of the block its event was read
from, and each event cursor the hashes of the last blocks it handled, so that a reorganised
chain is noticed and what was read from the lost blocks read again (issue 20).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("requests", "claims"):
        with op.batch_alter_table(table) as batch:
            # Null on rows read before this revision: they are taken as canonical.
            batch.add_column(sa.Column("block_hash", sa.String(66), nullable=True))
    op.create_table(
        "cursor_checkpoints",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("block_number", sa.BigInteger, primary_key=True),
        sa.Column("block_hash", sa.String(66), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cursor_checkpoints")
    for table in ("requests", "claims"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("block_hash")
