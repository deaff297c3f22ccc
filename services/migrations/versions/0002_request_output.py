"""The provider's answer on its request row, written before the commit is sent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: only requests this node answers have one; a crash between writing it and the
    # commit landing leaves the row in `committing`, and the restart commits this very output.
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("output", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("output")
