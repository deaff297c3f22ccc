"""The hash of the provider's commit transaction on its request row, written before it is sent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A restarted node that finds the transaction still pending waits for it instead of
    # sending a second commit, which could only revert and cost gas.
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("commit_tx", sa.String(66), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("commit_tx")
